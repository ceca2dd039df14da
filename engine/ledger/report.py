"""``coupon-engine report``: how a round went, from the ledger alone.

Reads ``<data dir>/ledger.sqlite3`` (never Redis, so it works after the round,
with Redis down, and on a copy of the ledger) and writes into ``--out``:

- ``report.html``: one self-contained page (figures embedded as data URIs) with a
  summary in Chinese and English and every table;
- one PNG per figure, and the numbers behind each as CSV (UTF-8 with a BOM, so
  spreadsheet programs show Chinese names);
- ``summary.json``, also printed on stdout.

Everything is counted from ``events`` (grants, voids, redemptions) and
``settlements``; the campaign document is the ledger's copy. What each number
means is in docs/ledger.md, "Round report".
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

from ..campaign import Campaign, Round
from .csvsafe import SafeWriter, open_report
from .db import AuditRow, Ledger, event_id_key

# Lines drawn per venue in the sell-out curve; the others are summed into one.
TOP_VENUES = 10
BURST_SECONDS = 60
KIND_NAMES = {"ski": "滑雪 ski", "skating": "滑冰 skating", "hot_spring": "温泉 hot spring",
              "snow_park": "冰雪乐园 snow park", "scenic": "景区 scenic"}
# A marker on the sell-out curve: (seconds since the round opened, label).
Marker = tuple[float, str]


class ReportError(Exception):
    """Bad input (no ledger, no campaign, unknown round): exit 2 with this reason."""


# -- reading the ledger ----------------------------------------------------------


class Progress:
    """A one-line progress count on a terminal; silent when stderr is a file or pipe."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, what: str, done: int, total: int) -> None:
        if self.live:
            self.stream.write(f"\r{what}: {done:,} / {total:,}")
            self.stream.flush()

    def done(self, what: str) -> None:
        if self.live:
            self.stream.write(f"\r{what}\033[K\n")
            self.stream.flush()


@dataclass
class VenueLine:
    venue_id: str
    name: str
    kind: str
    city: str
    stock: int
    grant_ms: list[int] = field(default_factory=list)   # this round's grants, in order
    sold_out_ms: int | None = None                       # first moment remaining hit 0


@dataclass
class Report:
    campaign: Campaign
    round: Round
    lines: list[VenueLine]
    burst: list[int]                          # grants in each second of the first minute
    by_kind: list[tuple[str, int, int]]       # kind, issued in the round, in the campaign
    by_city: list[tuple[str, int, int]]
    members: list[tuple[int, int]]            # coupons over the campaign -> members
    round_members: int
    redemption: list[dict[str, Any]]          # per venue, campaign-wide
    weeks: list[dict[str, Any]]
    budget: dict[str, int]
    # The operators' actions on this round (pause, resume, close, add stock), in order.
    actions: list[AuditRow] = field(default_factory=list)


def _campaign_events(db: sqlite3.Connection, campaign_id: str, progress: Progress
                     ) -> Iterator[tuple[str, str, str, str, str, int, int | None]]:
    """(event_id, type, round, venue, member, at_ms, restocked) of every event."""
    total = db.execute("SELECT count(*) FROM events WHERE campaign_id = ?",
                       (campaign_id,)).fetchone()[0]
    cur = db.execute("SELECT event_id, type, round_id, venue_id, member_id, at_ms, restocked"
                     " FROM events WHERE campaign_id = ?", (campaign_id,))
    n = 0
    while True:
        rows = cur.fetchmany(20_000)
        if not rows:
            break
        n += len(rows)
        progress.step("reading the ledger's events", n, total)
        yield from rows
    progress.done(f"read {n:,} events")


def _week_start(ms: int, tz: ZoneInfo) -> date:
    d = datetime.fromtimestamp(ms / 1000, tz).date()
    return d - timedelta(days=d.weekday())


def pick_round(c: Campaign, granted_rounds: set[str], round_id: str | None) -> Round:
    if round_id is not None:
        r = c.round(round_id)
        if r is None:
            raise ReportError(f"unknown round {round_id!r} (campaign {c.id} has "
                              f"{', '.join(x.id for x in c.rounds)})")
        return r
    # The latest round that has granted anything; before any grant, the first round.
    with_grants = [r for r in c.rounds if r.id in granted_rounds]
    return max(with_grants, key=lambda r: r.opens_at_ms) if with_grants else \
        min(c.rounds, key=lambda r: r.opens_at_ms)


def collect(ledger: Ledger, round_id: str | None, progress: Progress | None = None) -> Report:
    progress = progress or Progress()
    c = ledger.campaign()
    if c is None:
        raise ReportError(f"the ledger {ledger.path} holds no campaign (run"
                          " `coupon-engine archive` first)")
    tz = ZoneInfo(c.timezone)
    events = sorted(_campaign_events(ledger.db, c.id, progress),
                    key=lambda e: event_id_key(e[0]))
    r = pick_round(c, {e[2] for e in events if e[1] == "grant"}, round_id)
    venues = {v.id: v for v in c.venues}
    lines = {vid: VenueLine(vid, venues[vid].name if vid in venues else vid,
                            venues[vid].kind if vid in venues else "",
                            venues[vid].city if vid in venues else "", n)
             for vid, n in r.stock.items()}
    audits = ledger.audit_of(c.id, r.id)
    actions = [a for a in audits if a.action != "reverse"]
    # Stock an operator added joins the line when it was added, not at the opening.
    adds = sorted((event_id_key(a.event_id), a.venue_id or "", a.units or 0)
                  for a in actions if a.action == "add_stock")
    remaining = dict(r.stock)
    for _k, vid, n in adds:
        remaining[vid] = remaining.get(vid, 0) - n
    issued: dict[str, int] = {}
    void: dict[str, int] = {}
    back_open: dict[str, int] = {}
    redeemed: dict[str, int] = {}
    per_member: dict[str, int] = {}
    round_members: set[str] = set()
    kind_round: dict[str, int] = {}
    city_round: dict[str, int] = {}
    weeks: dict[date, list[int]] = {}    # week -> [issued, void, redeemed]
    burst = [0] * BURST_SECONDS
    pending_adds = list(reversed(adds))
    for _eid, etype, rid, vid, member, at, restocked in events:
        while pending_adds and pending_adds[-1][0] < event_id_key(_eid):
            _k, add_vid, n = pending_adds.pop()
            remaining[add_vid] = remaining.get(add_vid, 0) + n
        week = weeks.setdefault(_week_start(at, tz), [0, 0, 0])
        if etype == "grant":
            issued[vid] = issued.get(vid, 0) + 1
            per_member[member] = per_member.get(member, 0) + 1
            week[0] += 1
        elif etype == "void":
            void[vid] = void.get(vid, 0) + 1
            week[1] += 1
            if restocked:
                back_open[vid] = back_open.get(vid, 0) + 1
        elif etype == "redeem":
            redeemed[vid] = redeemed.get(vid, 0) + 1
            week[2] += 1
        elif etype == "reverse":
            # An operator's reverse: that redemption is not one any more.
            redeemed[vid] = redeemed.get(vid, 0) - 1
            week[2] -= 1
        if rid != r.id or vid not in lines:
            continue
        line = lines[vid]
        if etype == "grant":
            line.grant_ms.append(at)
            round_members.add(member)
            v = venues.get(vid)
            if v is not None:
                kind_round[v.kind] = kind_round.get(v.kind, 0) + 1
                city_round[v.city] = city_round.get(v.city, 0) + 1
            second = (at - r.opens_at_ms) // 1000
            if 0 <= second < BURST_SECONDS:
                burst[second] += 1
            remaining[vid] -= 1
            if remaining[vid] <= 0 and line.sold_out_ms is None:
                line.sold_out_ms = at
        elif etype == "void" and restocked:
            # A void while the round was open put the coupon back on sale.
            remaining[vid] += 1

    def grouped(attr: str, in_round: dict[str, int]) -> list[tuple[str, int, int]]:
        campaign_wide: dict[str, int] = {}
        for v in c.venues:
            campaign_wide[getattr(v, attr)] = campaign_wide.get(getattr(v, attr), 0) + \
                issued.get(v.id, 0)
        keys = sorted(campaign_wide, key=lambda k: (-campaign_wide[k], k))
        return [(k, in_round.get(k, 0), campaign_wide[k]) for k in keys]

    counts = sorted(set(per_member.values()) | set(range(1, c.member_campaign_quota + 1)))
    members = [(n, sum(1 for m in per_member.values() if m == n)) for n in counts]
    redemption = []
    for v in c.venues:
        i, vd, rd = issued.get(v.id, 0), void.get(v.id, 0), redeemed.get(v.id, 0)
        redemption.append({"venue_id": v.id, "name": v.name, "issued": i, "void": vd,
                           "returned_open": back_open.get(v.id, 0),
                           "returned_closed": vd - back_open.get(v.id, 0), "redeemed": rd})
    week_rows = []
    if weeks:
        first, last = min(weeks), max(weeks)
        cum_i = cum_r = 0
        d = first
        while d <= last:
            i, vd, rd = weeks.get(d, [0, 0, 0])
            cum_i += i
            cum_r += rd
            week_rows.append({"week_start": d.isoformat(), "issued": i, "void": vd,
                              "redeemed": rd, "cumulative_issued": cum_i,
                              "cumulative_redeemed": cum_r})
            d += timedelta(days=7)
    n_issued, n_void, n_redeemed = (sum(x.values()) for x in (issued, void, redeemed))
    settled = ledger.db.execute(
        "SELECT count(*), coalesce(sum(amount_fen), 0) FROM settlements WHERE campaign_id = ?",
        (c.id,)).fetchone()
    budget = {"budget_fen": c.budget_fen,
              "committed_fen": (n_issued - n_void) * c.settlement_fen,
              "redeemed_fen": n_redeemed * c.settlement_fen,
              "settled_fen": settled[1], "settled_codes": settled[0],
              "issued": n_issued, "void": n_void, "redeemed": n_redeemed}
    return Report(c, r, list(lines.values()), burst, grouped("kind", kind_round),
                  grouped("city", city_round), members, len(round_members), redemption,
                  week_rows, budget, actions)


ACTION_LABELS = {"pause": "暂停 pause", "resume": "恢复 resume", "close": "结束 close",
                 "add_stock": "加库存 add stock"}


def action_markers(rep: Report) -> list[Marker]:
    """The operators' pauses, resumes and closes of the round as (seconds since it
    opened, label), for the sell-out curve."""
    opens = rep.round.opens_at_ms
    return [((a.at_ms - opens) / 1000, f"{ACTION_LABELS[a.action]} ({a.actor})")
            for a in rep.actions if a.action in ("pause", "resume", "close")]


# -- numbers -----------------------------------------------------------------------


def yuan(fen: int) -> str:
    """Exact yuan with two decimals (no float rounding)."""
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def share(part: int, whole: int) -> str:
    return f"{part / whole:.4f}" if whole else ""


def seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}"


def local_time(ms: int, tz: str) -> str:
    dt = datetime.fromtimestamp(ms / 1000, ZoneInfo(tz))
    return dt.isoformat(timespec="milliseconds")


def curve_step_ms(span_ms: int) -> int:
    """Rows of the sell-out curve's CSV: tenths of a second for a burst, seconds for
    an hour, minutes beyond."""
    if span_ms <= 60_000:
        return 100
    if span_ms <= 3_600_000:
        return 1000
    return 60_000


def sellout_order(rep: Report) -> list[VenueLine]:
    return sorted(rep.lines, key=lambda ln: (ln.sold_out_ms is None, ln.sold_out_ms or 0,
                                             ln.venue_id))


def summary(rep: Report) -> dict[str, Any]:
    r, c = rep.round, rep.campaign
    granted = sum(len(ln.grant_ms) for ln in rep.lines)
    b = rep.budget
    out: dict[str, Any] = {
        "campaign_id": c.id, "round_id": r.id,
        "opens_at": local_time(r.opens_at_ms, c.timezone),
        "closes_at": local_time(r.closes_at_ms, c.timezone),
        "stock": sum(r.stock.values()), "coupons": granted, "members": rep.round_members,
        "venues": len(rep.lines),
        "venues_sold_out": sum(1 for ln in rep.lines if ln.sold_out_ms is not None),
        "first_sold_out_after_s": None, "all_sold_out_after_s": None,
        "redeemed": b["redeemed"], "issued": b["issued"],
        "redeemed_share": share(b["redeemed"], b["issued"]),
        "budget_fen": b["budget_fen"], "committed_fen": b["committed_fen"],
        "redeemed_fen": b["redeemed_fen"], "settled_fen": b["settled_fen"],
    }
    at = [ln.sold_out_ms for ln in rep.lines if ln.sold_out_ms is not None]
    if at:
        out["first_sold_out_after_s"] = round((min(at) - r.opens_at_ms) / 1000, 3)
        if len(at) == len(rep.lines):
            out["all_sold_out_after_s"] = round((max(at) - r.opens_at_ms) / 1000, 3)
    return out


def summary_text(s: dict[str, Any]) -> tuple[str, str]:
    """(Chinese, English) one-paragraph summary."""
    pct = f"{float(s['redeemed_share']) * 100:.1f}%" if s["redeemed_share"] else "0%"
    if s["all_sold_out_after_s"] is not None:
        zh_sold = f"全部 {s['venues']} 个场馆在开抢后 {s['all_sold_out_after_s']:g} 秒售罄"
        en_sold = f"all {s['venues']} venues sold out {s['all_sold_out_after_s']:g} s after opening"
    elif s["venues_sold_out"]:
        zh_sold = (f"{s['venues']} 个场馆中 {s['venues_sold_out']} 个售罄，最早在开抢后 "
                   f"{s['first_sold_out_after_s']:g} 秒")
        en_sold = (f"{s['venues_sold_out']} of {s['venues']} venues sold out, the first "
                   f"{s['first_sold_out_after_s']:g} s after opening")
    else:
        zh_sold = f"{s['venues']} 个场馆均未售罄"
        en_sold = f"none of the {s['venues']} venues sold out"
    zh = (f"第 {s['round_id']} 轮（{s['opens_at']} 开抢）：共发放 {s['coupons']:,} 张券"
          f"（库存 {s['stock']:,} 张），{s['members']:,} 名会员领到券；{zh_sold}。"
          f"截至目前整个活动已核销 {s['redeemed']:,} 张，占已发放的 {pct}。")
    en = (f"Round {s['round_id']} (opened {s['opens_at']}): {s['coupons']:,} coupons granted"
          f" (of {s['stock']:,} in stock) to {s['members']:,} members; {en_sold}."
          f" {s['redeemed']:,} coupons of the campaign redeemed so far ({pct} of issued).")
    return zh, en


def tables(rep: Report) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """CSV name -> (header, rows): every number the report shows."""
    r, c = rep.round, rep.campaign
    out: dict[str, tuple[list[str], list[list[Any]]]] = {}
    order = sorted(rep.lines, key=lambda ln: (-ln.stock, ln.venue_id))
    last = max((ms for ln in rep.lines for ms in ln.grant_ms), default=r.opens_at_ms)
    span = max(0, last - r.opens_at_ms)
    step = curve_step_ms(span)
    rows = []
    idx = [0] * len(order)
    t = 0
    while True:
        counts = []
        for i, ln in enumerate(order):
            # Grants up to and including this instant (ms since opening).
            while idx[i] < len(ln.grant_ms) and ln.grant_ms[idx[i]] - r.opens_at_ms <= t:
                idx[i] += 1
            counts.append(idx[i])
        rows.append([seconds(t), *counts, sum(counts)])
        if t >= span:
            break
        t += step
    out["sellout_curve"] = (["seconds_since_open", *[ln.venue_id for ln in order], "total"], rows)
    out["sellout_times"] = (
        ["venue_id", "name", "kind", "city", "stock", "granted", "sold_out_after_s",
         "sold_out_at"],
        [[ln.venue_id, ln.name, ln.kind, ln.city, ln.stock, len(ln.grant_ms),
          seconds(ln.sold_out_ms - r.opens_at_ms) if ln.sold_out_ms is not None else "",
          local_time(ln.sold_out_ms, c.timezone) if ln.sold_out_ms is not None else ""]
         for ln in sellout_order(rep)])
    out["burst"] = (["second", "grants"], [[i, n] for i, n in enumerate(rep.burst)])
    out["coupons_by_kind"] = (["kind", "issued_in_round", "issued_in_campaign"],
                              [list(x) for x in rep.by_kind])
    out["coupons_by_city"] = (["city", "issued_in_round", "issued_in_campaign"],
                              [list(x) for x in rep.by_city])
    out["members_by_coupons"] = (["coupons", "members"], [list(x) for x in rep.members])
    red_rows = []
    tot = {k: 0 for k in ("issued", "void", "returned_open", "returned_closed", "redeemed")}
    for v in rep.redemption:
        red_rows.append([v["venue_id"], v["name"], v["issued"], v["void"], v["returned_open"],
                         v["returned_closed"], v["redeemed"], share(v["redeemed"], v["issued"]),
                         share(v["redeemed"], v["issued"] - v["void"])])
        for k in tot:
            tot[k] += v[k]
    red_rows.append(["TOTAL", "", tot["issued"], tot["void"], tot["returned_open"],
                     tot["returned_closed"], tot["redeemed"], share(tot["redeemed"], tot["issued"]),
                     share(tot["redeemed"], tot["issued"] - tot["void"])])
    out["redemption_by_venue"] = (
        ["venue_id", "name", "issued", "void", "returned_open", "returned_closed", "redeemed",
         "redeemed_share_of_issued", "redeemed_share_of_live"], red_rows)
    out["redemption_by_week"] = (
        ["week_start", "issued", "void", "redeemed", "cumulative_issued",
         "cumulative_redeemed", "cumulative_redeemed_share"],
        [[w["week_start"], w["issued"], w["void"], w["redeemed"], w["cumulative_issued"],
          w["cumulative_redeemed"], share(w["cumulative_redeemed"], w["cumulative_issued"])]
         for w in rep.weeks])
    out["operator_actions"] = (
        ["at", "seconds_since_open", "action", "venue_id", "units", "by", "reason"],
        [[local_time(a.at_ms, c.timezone), seconds(a.at_ms - r.opens_at_ms), a.action,
          a.venue_id or "", a.units or "", a.actor, a.reason] for a in rep.actions])
    b = rep.budget
    out["budget"] = (["item", "fen", "yuan", "share_of_budget"], [
        [k, b[f"{k}_fen"], yuan(b[f"{k}_fen"]), share(b[f"{k}_fen"], b["budget_fen"])]
        for k in ("budget", "committed", "redeemed", "settled")] + [
        ["remaining", b["budget_fen"] - b["committed_fen"],
         yuan(b["budget_fen"] - b["committed_fen"]),
         share(b["budget_fen"] - b["committed_fen"], b["budget_fen"])]])
    return out


# -- figures -----------------------------------------------------------------------


def _pyplot(warn: Callable[[str], None]) -> Any:
    """matplotlib's pyplot on the Agg backend with a font that has Chinese glyphs."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import font_manager
    from matplotlib import pyplot as plt
    names = []
    for path in sorted(font_manager.findSystemFonts()):
        if "NotoSansCJK" in Path(path).name and "Regular" in Path(path).name:
            font_manager.fontManager.addfont(path)
            names.append(font_manager.FontProperties(fname=path).get_name())
    if not names:
        warn("no CJK font found (Debian: apt-get install fonts-noto-cjk); Chinese text in"
             " the figures will not render")
    plt.rcParams["font.family"] = "sans-serif"
    plt.rcParams["font.sans-serif"] = [*names[:1], "DejaVu Sans"]
    plt.rcParams["axes.unicode_minus"] = False
    return plt


def draw_markers(ax: Any, markers: Sequence[Marker]) -> None:
    """Vertical lines at moments of the round: the operators' pauses, resumes and
    closes, from the ledger's audit (``action_markers(rep)``)."""
    for t, label in markers:
        ax.axvline(t, color="#b03030", linestyle="--", linewidth=1)
        ax.annotate(label, (t, 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=8, color="#b03030")


def fig_sellout(plt: Any, rep: Report, markers: Sequence[Marker]) -> Any:
    r = rep.round
    order = sorted(rep.lines, key=lambda ln: (-ln.stock, ln.venue_id))
    shown = order if len(order) <= TOP_VENUES + 1 else order[:TOP_VENUES]
    rest = order[len(shown):]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.4]})

    def step(ax: Any, ms: list[int], **kw: Any) -> None:
        xs = [0.0] + [(m - r.opens_at_ms) / 1000 for m in ms]
        ax.step(xs, list(range(len(xs))), where="post", **kw)

    everything = sorted(m for ln in rep.lines for m in ln.grant_ms)
    step(top, everything, color="black", linewidth=2, label="合计 total")
    top.axhline(sum(r.stock.values()), color="grey", linestyle=":", linewidth=1)
    top.set_ylabel("已发放 coupons granted")
    top.legend(loc="lower right")
    colours = plt.get_cmap("tab20").colors
    for i, ln in enumerate(shown):
        step(bottom, ln.grant_ms, linewidth=1.3, color=colours[(2 * i) % 20 + (2 * i) // 20],
             label=f"{ln.venue_id} {ln.name}")
    if rest:
        step(bottom, sorted(m for ln in rest for m in ln.grant_ms), linewidth=1.5,
             color="black", linestyle="--", label=f"其他 {len(rest)} 个场馆 other venues")
    bottom.set_ylabel("各场馆 per venue")
    bottom.set_xlabel("开抢后秒数 seconds since the round opened")
    bottom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        draw_markers(ax, markers)
    fig.suptitle(f"第 {r.id} 轮售罄曲线 Sell-out curve of round {r.id}")
    fig.tight_layout()
    return fig


def fig_burst(plt: Any, rep: Report) -> Any:
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar(range(BURST_SECONDS), rep.burst, width=0.9, color="#3070b0")
    ax.set_xlabel("开抢后第几秒 second after opening")
    ax.set_ylabel("每秒发放 grants / s")
    ax.set_title(f"开抢第一分钟 The first minute of round {rep.round.id}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_grouped(plt: Any, rows: list[tuple[str, int, int]], title: str,
                names: dict[str, str] | None = None) -> Any:
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.6))
    labels = [(names or {}).get(k, k) for k, _, _ in rows]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [x[2] for x in rows], height=0.4, label="活动累计 campaign",
            color="#90b0d0")
    ax.barh([y - 0.2 for y in ys], [x[1] for x in rows], height=0.4, label="本轮 this round",
            color="#3070b0")
    ax.set_yticks(list(ys), labels)
    ax.invert_yaxis()
    ax.set_xlabel("已发放 coupons issued")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_members(plt: Any, rep: Report) -> Any:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([str(n) for n, _ in rep.members], [m for _, m in rep.members], color="#3070b0")
    ax.set_xlabel("每人领到券数 coupons per member (campaign)")
    ax.set_ylabel("会员数 members")
    ax.set_title("会员领券数量分布 Members by coupons received")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_redemption(plt: Any, rep: Report) -> Any:
    rows = [v for v in rep.redemption if v["issued"]]
    rows.sort(key=lambda v: -(v["redeemed"] / v["issued"]))
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.6))
    ax.barh([f"{v['venue_id']} {v['name']}" for v in rows],
            [v["redeemed"] / v["issued"] * 100 for v in rows], color="#30a070")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("已核销 / 已发放 redeemed / issued (%)")
    ax.set_title("各场馆核销率 Redemption by venue (campaign)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def fig_weeks(plt: Any, rep: Report) -> Any:
    fig, ax = plt.subplots(figsize=(10, 3.8))
    xs = [w["week_start"] for w in rep.weeks]
    ax.bar(xs, [w["redeemed"] for w in rep.weeks], color="#30a070", label="核销 redeemed")
    ax.bar(xs, [w["void"] for w in rep.weeks], bottom=[w["redeemed"] for w in rep.weeks],
           color="#d0a040", label="退券 void")
    ax.set_ylabel("每周 per week")
    ax.set_xlabel("周（周一）week starting Monday")
    ax.tick_params(axis="x", rotation=30)
    share_ax = ax.twinx()
    share_ax.plot(xs, [w["cumulative_redeemed"] / w["cumulative_issued"] * 100
                       if w["cumulative_issued"] else 0 for w in rep.weeks],
                  color="black", marker="o", label="累计核销率 cumulative share")
    share_ax.set_ylim(0, 100)
    share_ax.set_ylabel("累计核销率 redeemed / issued (%)")
    ax.legend(loc="upper left")
    share_ax.legend(loc="upper right")
    ax.set_title("按周核销 Redemption over the season")
    fig.tight_layout()
    return fig


def fig_budget(plt: Any, rep: Report) -> Any:
    b = rep.budget
    items = [("预算 budget", b["budget_fen"], "#c0c0c0"),
             ("已承诺 committed", b["committed_fen"], "#3070b0"),
             ("已核销 redeemed", b["redeemed_fen"], "#30a070"),
             ("已结算 settled", b["settled_fen"], "#806030")]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.barh([n for n, _, _ in items], [f / 100 / 10_000 for _, f, _ in items],
            color=[c for _, _, c in items])
    for i, (_, f, _) in enumerate(items):
        ax.annotate(f"¥{f // 100:,}.{f % 100:02d}", (f / 100 / 10_000, i), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("万元 10,000 yuan")
    ax.set_title("预算 Budget (yuan)")
    ax.set_xlim(0, max(f for _, f, _ in items) / 100 / 10_000 * 1.3 or 1)
    fig.tight_layout()
    return fig


# -- output ------------------------------------------------------------------------

FIGURES = [
    ("sellout_curve", "售罄曲线 Sell-out curve"),
    ("burst", "开抢第一分钟 Grants per second in the first minute"),
    ("coupons_by_kind", "按场馆类型 Coupons by venue kind"),
    ("coupons_by_city", "按城市 Coupons by city"),
    ("members_by_coupons", "会员领券数 Members by coupons"),
    ("redemption_by_venue", "各场馆核销 Redemption by venue"),
    ("redemption_by_week", "按周核销 Redemption by week"),
    ("budget", "预算 Budget"),
]


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    # Venue names and cities come from the campaign file: spreadsheet-safe (csvsafe).
    with open_report(path) as f:
        w = SafeWriter(f)
        w.writerow(header)
        for row in rows:
            w.writerow(row)


def _html_table(header: list[str], rows: list[list[Any]], limit: int | None = None) -> str:
    body = rows if limit is None else rows[:limit]
    out = ["<table><thead><tr>", *(f"<th>{html.escape(h)}</th>" for h in header),
           "</tr></thead><tbody>"]
    for row in body:
        cells = "".join(
            f"<td class='{'num' if isinstance(x, int) or _numeric(x) else ''}'>"
            f"{html.escape(str(x))}</td>" for x in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    if limit is not None and len(rows) > limit:
        out.append(f"<p class='note'>… {len(rows) - limit} more rows in the CSV</p>")
    return "".join(out)


def _numeric(x: Any) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


CSS = """
body { font-family: "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", sans-serif;
       margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.summary { background: #f3f6fa; border-left: 4px solid #3070b0; padding: .8em 1.2em; }
.summary p { margin: .4em 0; line-height: 1.6; }
img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; } th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: .85em; }
"""


def render_html(rep: Report, s: dict[str, Any], images: dict[str, bytes],
                tabs: dict[str, tuple[list[str], list[list[Any]]]]) -> str:
    zh, en = summary_text(s)
    c, r = rep.campaign, rep.round
    parts = [
        "<!DOCTYPE html><html lang='zh-CN'><head><meta charset='utf-8'>",
        f"<title>{html.escape(c.name)} · {html.escape(r.id)} 报告 report</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(c.name)} · 第 {html.escape(r.id)} 轮报告 Round report</h1>",
        f"<div class='summary'><p lang='zh-CN'>{html.escape(zh)}</p>"
        f"<p lang='en'>{html.escape(en)}</p></div>",
        f"<p class='note'>From the ledger only (campaign {html.escape(c.id)}); generated "
        f"{html.escape(datetime.now(ZoneInfo(c.timezone)).isoformat(timespec='seconds'))}."
        " Every number below is also in the CSV files beside this page.</p>",
    ]
    shown_tables = {"sellout_curve": "sellout_times"}
    for name, title in FIGURES:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        data = base64.b64encode(images[name]).decode()
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
        table = shown_tables.get(name, name)
        if name == "burst":
            continue  # sixty rows: the figure says it, burst.csv holds them
        header, rows = tabs[table]
        if table == "sellout_times":
            parts.append("<h3>各场馆售罄时间 Time each venue sold out</h3>")
        parts.append(_html_table(header, rows))
        if name == "sellout_curve" and rep.actions:
            # The dashed lines on the curve: who did what, when, and why.
            parts.append("<h3>运营操作 Operator actions</h3>")
            parts.append(_html_table(*tabs["operator_actions"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write(rep: Report, out_dir: Path, markers: Sequence[Marker] = (),
          warn: Callable[[str], None] | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Every file of the report into ``out_dir``; returns the summary. Files are
    written to a temporary folder first and moved at the end, so a failure
    leaves no half report."""
    warn = warn or _warn
    progress = progress or Progress()
    plt = _pyplot(warn)
    tabs = tables(rep)
    s = summary(rep)
    makers: dict[str, Callable[[], Any]] = {
        "sellout_curve": lambda: fig_sellout(plt, rep, markers),
        "burst": lambda: fig_burst(plt, rep),
        "coupons_by_kind": lambda: fig_grouped(plt, rep.by_kind,
                                               "按场馆类型 Coupons by venue kind", KIND_NAMES),
        "coupons_by_city": lambda: fig_grouped(plt, rep.by_city, "按城市 Coupons by city"),
        "members_by_coupons": lambda: fig_members(plt, rep),
        "redemption_by_venue": lambda: fig_redemption(plt, rep),
        "redemption_by_week": lambda: fig_weeks(plt, rep),
        "budget": lambda: fig_budget(plt, rep),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        images: dict[str, bytes] = {}
        for i, (name, _) in enumerate(FIGURES):
            progress.step("drawing figures", i, len(FIGURES))
            fig = makers[name]()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            plt.close(fig)
            images[name] = buf.getvalue()
            (tmp / f"{name}.png").write_bytes(images[name])
        progress.done(f"drew {len(FIGURES)} figures")
        for name, (header, rows) in tabs.items():
            _write_csv(tmp / f"{name}.csv", header, rows)
        (tmp / "summary.json").write_text(json.dumps(s, ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
        (tmp / "report.html").write_text(render_html(rep, s, images, tabs), encoding="utf-8")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return s


def _warn(message: str) -> None:
    sys.stderr.write(f"coupon-engine: warning: {message}\n")


def run(ledger_path: Path, round_id: str | None, out_dir: Path,
        stream: IO[str] | None = None) -> dict[str, Any]:
    """The command: check the input, read the ledger, write the report."""
    if not ledger_path.is_file():
        raise ReportError(f"no ledger at {ledger_path}; the report is made from it")
    progress = Progress(stream)
    with Ledger(ledger_path) as ledger:
        rep = collect(ledger, round_id, progress)
    # The operators' pauses, resumes and closes (the ledger's audit) mark the curve.
    return write(rep, out_dir, action_markers(rep), progress=progress)
