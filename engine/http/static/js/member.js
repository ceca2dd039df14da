/* The members' grab page (/). docs/pages.md: clock, credentials, retry rule, polling. */
(function () {
  var el = CE.el, $ = CE.$;
  var TOKEN_KEY = "ce.memberToken";
  var PENDING_KEY = "ce.pendingGrab";
  // A tap's retries: at most this many requests and this long in all (docs/pages.md).
  var GRAB_ATTEMPTS = 6, GRAB_BUDGET_MS = 30000, RETRY_CAP_S = 5;

  var S = {
    campaign: null, venues: {}, rounds: [], token: null, member: null,
    coupons: [], qr: {}, soldOut: {}, busy: false, pollTimer: 0, lastPhase: "",
    grabbed: null
  };

  /* ---- credentials ---- */
  function claims(token) {
    try {
      var part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(decodeURIComponent(Array.prototype.map.call(atob(part), function (c) {
        return "%" + ("00" + c.charCodeAt(0).toString(16)).slice(-2);
      }).join("")));
    } catch (e) { return null; }
  }

  function useToken(token) {
    var c = token ? claims(token) : null;
    if (!c || typeof c.sub !== "string" || typeof c.exp !== "number" ||
        c.exp * 1000 <= CE.engineNow()) {
      if (token) notice("bad", "登录已过期，请从工会App重新进入本页面。");
      CE.save(TOKEN_KEY, null);
      S.token = null; S.member = null;
    } else {
      S.token = token; S.member = c.sub;
    }
    renderAccount();
  }

  function signOut() {
    CE.save(TOKEN_KEY, null);
    S.token = null; S.member = null; S.coupons = []; dropQr();
    renderAccount(); renderVenues(); renderCoupons();
  }

  function renderAccount() {
    var box = $("account");
    CE.clear(box);
    $("signin").hidden = !!S.token;
    if (S.token) {
      box.appendChild(el("span", { id: "member-id", text: "会员 " + S.member }));
      box.appendChild(el("button", { type: "button", class: "link", id: "sign-out",
                                     text: "退出", onclick: signOut }));
    }
  }

  async function demoSignIn(ev) {
    ev.preventDefault();
    var id = $("demo-member").value.trim();
    var res = await CE.api("POST", "/v1/demo/sign-in", { json: { member_id: id } });
    if (res.status !== 200) {
      notice("bad", res.status === 400 ? "会员号只能包含字母、数字和 _ . -（1-64 个字符）"
                                       : "演示登录失败，请稍后再试。");
      return;
    }
    CE.save(TOKEN_KEY, res.body.token);
    useToken(res.body.token);
    notice("ok", "已用演示账号登录：" + res.body.member_id);
    renderVenues();
    loadCoupons();
  }

  /* ---- rounds, by the engine's clock ---- */
  function phaseOf(r, now) {
    if (now < Date.parse(r.opens_at)) return "scheduled";
    if (now >= Date.parse(r.closes_at)) return "closed";
    return "open";
  }

  /* The open round, else the next to open, else the last that closed. */
  function currentRound(now) {
    var open = null, next = null, last = null;
    S.rounds.forEach(function (r) {
      var p = phaseOf(r, now);
      if (p === "open") open = r;
      else if (p === "scheduled" && (!next || Date.parse(r.opens_at) < Date.parse(next.opens_at))) next = r;
      else if (p === "closed" && (!last || Date.parse(r.closes_at) > Date.parse(last.closes_at))) last = r;
    });
    return open || next || last;
  }

  var PHASE_LABEL = { scheduled: "未开始", open: "进行中", closed: "已结束" };

  function renderRounds() {
    var tz = S.campaign.timezone, now = CE.engineNow(), list = $("rounds");
    var cur = currentRound(now);
    CE.clear(list);
    S.rounds.forEach(function (r) {
      var p = phaseOf(r, now);
      list.appendChild(el("li", { class: "round " + p + (cur && cur.id === r.id ? " current" : ""),
                                  "data-round": r.id },
        el("span", { class: "round-id", text: "第 " + r.id + " 场" }),
        el("span", { class: "round-time", text: CE.when(r.opens_at, tz) + " – " +
                                                CE.when(r.closes_at, tz, "hm") }),
        el("span", { class: "round-state", text: PHASE_LABEL[p] })));
    });
  }

  function allSoldOut(r) {
    return r.venues.length > 0 && r.venues.every(function (v) {
      return v.remaining <= 0 || S.soldOut[r.id + ":" + v.venue_id];
    });
  }

  function renderCountdown() {
    var now = CE.engineNow(), r = currentRound(now), box = $("countdown");
    var tz = S.campaign.timezone;
    if (!r) { box.textContent = "暂无场次"; return; }
    var p = phaseOf(r, now);
    if (p === "scheduled") {
      box.className = "countdown scheduled";
      CE.clear(box);
      box.appendChild(el("span", { text: "距第 " + r.id + " 场开抢还有 " }));
      box.appendChild(el("strong", { id: "countdown-time",
                                     text: CE.countdown(Date.parse(r.opens_at) - now) }));
      box.appendChild(el("small", { text: "（" + CE.when(r.opens_at, tz, "full") + " 开抢，以服务器时间为准）" }));
    } else if (p === "open") {
      box.className = "countdown open";
      box.textContent = allSoldOut(r) ? "第 " + r.id + " 场的券已全部抢光"
        : "第 " + r.id + " 场抢券进行中，" + CE.when(r.closes_at, tz, "hm") + " 结束";
    } else {
      box.className = "countdown closed";
      box.textContent = "本期场次已全部结束，感谢参与";
    }
  }

  function venueButton(r, v, phase) {
    var line = r.id + ":" + v.venue_id;
    var sold = v.remaining <= 0 || S.soldOut[line];
    var label = "抢券", disabled = false;
    if (phase === "scheduled") { label = "未开始"; disabled = true; }
    else if (phase === "closed") { label = "已结束"; disabled = true; }
    else if (sold) { label = "已抢光"; disabled = true; }
    else if (!S.token) { label = "请先登录"; disabled = true; }
    else if (S.busy) { label = S.busy === line ? "抢券中…" : "抢券"; disabled = true; }
    return el("button", { type: "button", class: "grab", "data-venue": v.venue_id,
                          disabled: disabled, text: label,
                          onclick: function () { grab(r.id, v.venue_id); } });
  }

  function renderVenues() {
    var now = CE.engineNow(), r = currentRound(now), list = $("venues");
    CE.clear(list);
    if (!r) return;
    var phase = phaseOf(r, now);
    $("venues-title").textContent = "第 " + r.id + " 场 · 每人限抢 " + r.member_round_quota + " 张";
    r.venues.forEach(function (v) {
      var info = S.venues[v.venue_id] || {};
      var sold = v.remaining <= 0 || S.soldOut[r.id + ":" + v.venue_id];
      list.appendChild(el("li", { class: "venue" + (sold ? " sold-out" : ""),
                                  "data-venue": v.venue_id },
        el("div", { class: "venue-main" },
          el("strong", { class: "venue-name", text: v.name }),
          el("span", { class: "venue-meta",
                       text: (CE.KIND[v.kind] || v.kind) + " · " + (info.city || "") })),
        el("div", { class: "venue-side" },
          el("span", { class: "venue-stock",
                       text: sold ? "已抢光" : "剩余 " + v.remaining + " / " + v.stock }),
          venueButton(r, v, phase))));
    });
    S.lastPhase = r.id + ":" + phase;
  }

  function renderAll() { renderRounds(); renderCountdown(); renderVenues(); }

  /* ---- notices ---- */
  function notice(kind, text) {
    var box = $("notice");
    box.className = "notice " + kind;
    box.textContent = text;
    box.hidden = false;
  }

  var GRAB_TEXT = {
    sold_out: function () { return "这个场馆本场的券已抢光，看看其他场馆吧。"; },
    round_quota_exceeded: function (e, r) {
      return "本场每人限抢 " + r.member_round_quota + " 张，您已抢满，请等下一场。";
    },
    campaign_quota_exceeded: function () {
      return "本次活动每人最多领 " + S.campaign.member_campaign_quota +
             " 张券，您已领满（退券不退还领券名额）。";
    },
    round_not_open: function (e) {
      return "本场还没开始" + (e.opens_at ? "，" + CE.when(e.opens_at, S.campaign.timezone, "full") + " 开抢" : "") + "。";
    },
    round_paused: function () { return "本场暂停发券，请稍后再试。"; },
    round_closed: function () { return "本场已结束。"; },
    round_not_found: function () { return "没有这个场次，请刷新页面。"; },
    venue_not_found: function () { return "本场没有这个场馆的券，请刷新页面。"; },
    idempotency_key_reused: function () { return "请求重复，请重新点击抢券。"; },
    rate_limited: function () { return "点得太快了，请稍后再试。"; },
    unavailable: function () { return "系统繁忙，请稍后再试。"; },
    unauthorized: function () { return "登录已过期，请从工会App重新进入本页面。"; },
    invalid_request: function () { return "请求有误，请刷新页面后重试。"; },
    network: function () { return "网络不通，请检查网络后重试。"; }
  };

  /* ---- the grab: one Idempotency-Key per tap intent, retried with the same key ---- */
  function pendingFor(roundId, venueId) {
    try {
      var p = JSON.parse(CE.load(PENDING_KEY) || "null");
      // An answer never came for this tap: the next tap on the same venue is the same
      // intent, so a coupon granted behind a lost reply is returned, not a second one.
      if (p && p.round === roundId && p.venue === venueId && p.member === S.member &&
          Date.now() - p.at < 3600 * 1000) return p;
    } catch (e) { /* unreadable: a new intent */ }
    return null;
  }

  async function grab(roundId, venueId) {
    if (S.busy || !S.token) return;
    var round = S.rounds.filter(function (r) { return r.id === roundId; })[0];
    var line = roundId + ":" + venueId;
    var intent = pendingFor(roundId, venueId) ||
      { round: roundId, venue: venueId, member: S.member, key: CE.newKey(), at: Date.now() };
    CE.save(PENDING_KEY, JSON.stringify(intent));
    S.busy = line;
    renderVenues();
    notice("info", "正在抢券…");
    var started = performance.now(), outcome = null;
    for (var attempt = 1; attempt <= GRAB_ATTEMPTS; attempt++) {
      var res = await CE.api("POST", "/v1/rounds/" + encodeURIComponent(roundId) + "/grab",
                             { auth: S.token, json: { venue_id: venueId },
                               headers: { "Idempotency-Key": intent.key } });
      var err = CE.errorOf(res);
      var wait = null;
      if (res.status === 201) { outcome = { ok: res.body.coupon }; break; }
      if (res.network || res.status === 503 || res.status === 429) {
        // No answer, or "try again": the same key finds a coupon granted behind a lost
        // reply instead of asking for a second one.
        wait = Math.min(res.retryAfter === null ? 1 : res.retryAfter, RETRY_CAP_S) * 1000;
      } else if (err.code === "round_not_open" && err.opens_at &&
                 Date.parse(err.opens_at) - CE.engineNow() < 5000) {
        // The tap arrived a moment early (this clock is a round trip's guess): the
        // refusal is not recorded, so asking again at the opening is safe.
        wait = Math.max(0, Date.parse(err.opens_at) - CE.engineNow()) + 100;
      } else {
        outcome = { err: err };
        break;
      }
      wait += Math.random() * 400;  // a million retries must not land together
      if (attempt === GRAB_ATTEMPTS || performance.now() - started + wait > GRAB_BUDGET_MS) {
        // Out of tries: unknown after a lost answer, else the last refusal stands.
        outcome = res.network || res.status === 503 || res.status === 429
          ? { unknown: err } : { err: err };
        break;
      }
      notice("info", "网络繁忙，正在重试（第 " + (attempt + 1) + " 次）…");
      await CE.sleep(wait);
    }
    S.busy = false;
    if (outcome.ok) {
      CE.save(PENDING_KEY, null);
      S.grabbed = outcome.ok.code;
      notice("ok", "抢到了！" + (S.venues[venueId] ? S.venues[venueId].name : venueId) +
                   " 100元优惠券已放入「我的券」，券码 " + CE.displayCode(outcome.ok.code) + "。");
      loadCoupons();
      refreshRound(true);
    } else if (outcome.err) {
      CE.save(PENDING_KEY, null);  // a refusal is not recorded: the next tap starts afresh
      var text = GRAB_TEXT[outcome.err.code];
      notice("bad", text ? text(outcome.err, round) : "抢券失败（" + outcome.err.code + "）。");
      if (outcome.err.code === "sold_out") S.soldOut[line] = Date.now();
      if (outcome.err.code === "unauthorized") signOut();
    } else {
      // Keep the intent: the next tap on this venue repeats the same key.
      notice("bad", "网络繁忙，暂时无法确认结果。请稍后查看「我的券」，或再点一次抢券" +
                    "（同一次抢券不会重复领券）。");
      loadCoupons();
    }
    renderAll();
  }

  /* ---- 我的券 ---- */
  function dropQr() {
    Object.keys(S.qr).forEach(function (c) { URL.revokeObjectURL(S.qr[c]); });
    S.qr = {};
  }

  async function loadCoupons() {
    if (!S.token) { renderCoupons(); return; }
    var res = await CE.api("GET", "/v1/me/coupons", { auth: S.token, cache: "no-store" });
    if (res.status === 401) { signOut(); notice("bad", GRAB_TEXT.unauthorized()); return; }
    if (res.status !== 200) return;
    S.coupons = res.body.coupons;
    // Newest first, as the engine sends them; sorted again in case a proxy reorders nothing.
    S.coupons.sort(function (a, b) { return Date.parse(b.issued_at) - Date.parse(a.issued_at); });
    var wanted = {};
    await Promise.all(S.coupons.filter(function (c) { return c.status === "issued"; })
      .map(async function (c) {
        wanted[c.code] = true;
        if (S.qr[c.code]) return;
        var q = await CE.api("GET", "/v1/me/coupons/" + encodeURIComponent(c.code) + "/qr.svg",
                             { auth: S.token, blob: true });
        if (q.status === 200 && q.blob) S.qr[c.code] = URL.createObjectURL(q.blob);
      }));
    Object.keys(S.qr).forEach(function (code) {
      if (!wanted[code]) { URL.revokeObjectURL(S.qr[code]); delete S.qr[code]; }
    });
    renderCoupons();
  }

  var STATUS_LABEL = { issued: "可使用", redeemed: "已核销", void: "已退券" };

  function renderCoupons() {
    var list = $("coupons"), tz = S.campaign ? S.campaign.timezone : "Asia/Shanghai";
    CE.clear(list);
    $("coupons-empty").hidden = !S.token || S.coupons.length > 0;
    S.coupons.forEach(function (c) {
      var venue = S.venues[c.venue_id];
      var status = STATUS_LABEL[c.status] || c.status;
      if (c.status === "redeemed" && c.redeemed_at) status += " " + CE.when(c.redeemed_at, tz, "full");
      var item = el("li", { class: "coupon " + c.status + (S.grabbed === c.code ? " fresh" : ""),
                            "data-code": c.code },
        el("div", { class: "coupon-head" },
          el("strong", { text: venue ? venue.name : c.venue_id }),
          el("span", { class: "badge " + c.status, text: status })),
        el("div", { class: "coupon-value",
                    text: "抵扣 " + CE.yuan(c.face_value_fen) + " · 实付 " + CE.yuan(c.member_price_fen) +
                          " · 第 " + c.round_id + " 场" }),
        el("div", { class: "coupon-code", text: CE.displayCode(c.code) }),
        el("div", { class: "coupon-valid",
                    text: "有效期 " + CE.when(c.valid_from, tz) + " – " + CE.when(c.valid_until, tz) }));
      if (c.status === "issued") {
        if (S.qr[c.code]) {
          item.appendChild(el("img", { class: "qr", src: S.qr[c.code], alt: "券码二维码 " + c.code,
                                       width: "280", height: "280" }));
          item.appendChild(el("p", { class: "hint", text: "到场馆出示此二维码，由工作人员扫码核销" }));
        }
        item.appendChild(el("button", { type: "button", class: "void secondary", text: "退券",
                                        onclick: function () { voidCoupon(c); } }));
      }
      list.appendChild(item);
    });
  }

  async function voidCoupon(c) {
    var round = S.rounds.filter(function (r) { return r.id === c.round_id; })[0];
    var stillOpen = round && phaseOf(round, CE.engineNow()) === "open";
    var ok = await CE.confirmDialog("确定退还这张券吗？", [
      "券码 " + CE.displayCode(c.code) + " 退还后立即作废，不能恢复，也不能再到场馆使用。",
      stillOpen ? "本场还在进行，这张券会退回场馆，其他会员可以再抢。"
                : "本场已结束，这张券不会再发出。",
      "退券不退还您的领券名额：本场（限 " + (round ? round.member_round_quota : "") +
      " 张）和整个活动（限 " + S.campaign.member_campaign_quota + " 张）已领的张数不变。"
    ], "确认退券", "不退了", true);
    if (!ok) return;
    var res = await CE.api("DELETE", "/v1/me/coupons/" + encodeURIComponent(c.code),
                           { auth: S.token });
    var err = CE.errorOf(res);
    if (res.status === 200) notice("ok", "已退券，券码 " + CE.displayCode(c.code) + " 已作废。");
    else if (err.code === "already_redeemed") notice("bad", "这张券已经核销，不能退。");
    else if (err.code === "already_void") notice("bad", "这张券已经退过了。");
    else if (err.code === "coupon_not_found") notice("bad", "找不到这张券。");
    else if (err.code === "unauthorized") { signOut(); notice("bad", GRAB_TEXT.unauthorized()); }
    else notice("bad", (GRAB_TEXT[err.code] || GRAB_TEXT.unavailable)(err, round));
    loadCoupons();
    refreshRound(true);
  }

  /* ---- polling: at most every second while open, with jitter; never while hidden,
   * never once every venue is sold out (docs/pages.md) ---- */
  function schedulePoll() {
    clearTimeout(S.pollTimer);
    S.pollTimer = 0;
    if (document.hidden) return;
    var now = CE.engineNow(), r = currentRound(now);
    if (!r) return;
    var phase = phaseOf(r, now), delay;
    if (phase === "open") {
      if (allSoldOut(r)) return;
      delay = 1000 + Math.random() * 600;
    } else if (phase === "scheduled") {
      // Right after the opening (spread over 1.5 s), else a slow check for changes.
      delay = Math.min(Date.parse(r.opens_at) - now + 300 + Math.random() * 1500,
                       20000 + Math.random() * 10000);
    } else {
      return;
    }
    S.pollTimer = setTimeout(refreshRound, Math.max(0, delay));
  }

  /* fresh: after this member's own grab or void, revalidate (ETag) instead of taking
   * the browser's copy of up to a second ago, so the stock shown includes it. */
  async function refreshRound(fresh) {
    var r = currentRound(CE.engineNow());
    if (r) {
      var res = await CE.api("GET", "/v1/rounds/" + encodeURIComponent(r.id),
                             { cache: fresh === true ? "no-cache" : "default" });
      if (res.status === 200) {
        var view = res.body.round;
        S.rounds = S.rounds.map(function (x) { return x.id === view.id ? view : x; });
        view.venues.forEach(function (v) {
          // Stock seen again (a void gave one back), beyond the second it may lag.
          var line = view.id + ":" + v.venue_id;
          if (v.remaining > 0 && Date.now() - (S.soldOut[line] || 0) > 3000) delete S.soldOut[line];
        });
        renderAll();
      }
    }
    schedulePoll();
  }

  function tick() {
    if (!S.campaign) return;
    renderCountdown();
    var now = CE.engineNow(), r = currentRound(now);
    var phase = r ? r.id + ":" + phaseOf(r, now) : "";
    if (phase !== S.lastPhase) {  // a round opened or closed by the engine's clock
      renderRounds();
      renderVenues();
      schedulePoll();
    }
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { clearTimeout(S.pollTimer); S.pollTimer = 0; return; }
    // A phone that slept may have lost time: ask the engine's clock again, then refresh.
    CE.syncClock(2).then(function () { refreshRound(); tick(); });
  });

  async function start() {
    CE.takeFromFragment("token", TOKEN_KEY);
    var demo = $("demo-form");
    if (demo) demo.addEventListener("submit", demoSignIn);
    var results = await Promise.all([CE.api("GET", "/v1/campaign"), CE.syncClock(3),
                                     CE.api("GET", "/v1/rounds")]);
    var camp = results[0], rounds = results[2];
    if (camp.status !== 200 || rounds.status !== 200) {
      notice("bad", "活动信息加载失败，请下拉刷新重试。");
      setTimeout(start, 3000 + Math.random() * 3000);
      return;
    }
    if (!results[1]) notice("info", "未能与服务器对时，倒计时按手机时间显示。");
    S.campaign = camp.body.campaign;
    S.campaign.venues.forEach(function (v) { S.venues[v.venue_id] = v; });
    S.rounds = rounds.body.rounds;
    $("campaign-name").textContent = S.campaign.name;
    document.title = S.campaign.name + " · 抢券";
    useToken(CE.load(TOKEN_KEY));
    renderAll();
    schedulePoll();
    setInterval(tick, 200);
    loadCoupons();
    document.body.setAttribute("data-ready", "1");
  }

  start();
})();
