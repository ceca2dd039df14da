/* Shared by the members' and the venues' pages (bundled in front of each page's script).
 * No framework, no build step: plain ES2017 that the WebViews of WeChat and the
 * union's app run. Everything the pages show is built with DOM calls, never by
 * putting server text into innerHTML. docs/pages.md explains the choices. */
"use strict";

var CE = (function () {
  var KIND = { ski: "滑雪场", skating: "滑冰场", hot_spring: "温泉", snow_park: "雪乐园",
               scenic: "景区" };

  /* ---- storage that survives a browser refusing localStorage (private modes) ---- */
  var memory = {};
  function load(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return memory[key] || null; }
  }
  function save(key, value) {
    try {
      if (value === null) window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch (e) { if (value === null) delete memory[key]; else memory[key] = value; }
  }

  /* A credential handed over in the address's fragment (#token=... or #key=...): kept
   * on the device and removed from the address bar, so it is neither bookmarked,
   * shared with the link nor left in the history. Fragments never reach a server. */
  function takeFromFragment(name, storageKey) {
    var hash = window.location.hash.replace(/^#/, "");
    if (!hash) return;
    var params = new URLSearchParams(hash);
    var value = params.get(name);
    if (!value) return;
    save(storageKey, value);
    params.delete(name);
    var rest = params.toString();
    window.history.replaceState(null, "", window.location.pathname + window.location.search +
                                (rest ? "#" + rest : ""));
  }

  /* ---- the engine's clock ----
   * Phones are often minutes off, so countdowns and the grab button follow the engine's
   * clock: GET /v1/time gives the engine's time; the answer left the engine about half a
   * round trip before it arrived, so engine time at arrival = now + rtt/2. The shortest
   * of a few round trips is kept (the least skewed by queueing), and time is then counted
   * with performance.now(), which the phone's own clock corrections do not move. */
  var clock = { engine: 0, perf: 0, rtt: Infinity, synced: false };

  function engineNow() {
    if (!clock.synced) return Date.now();
    return clock.engine + (performance.now() - clock.perf);
  }

  async function syncClock(maxSamples) {
    var best = null;
    for (var i = 0; i < (maxSamples || 3); i++) {
      var t0 = performance.now();
      var res = await api("GET", "/v1/time", { cache: "no-store" });
      var t1 = performance.now();
      if (res.status !== 200) continue;
      var rtt = t1 - t0;
      if (best === null || rtt < best.rtt) {
        best = { engine: Date.parse(res.body.now) + rtt / 2, perf: t1, rtt: rtt };
      }
      if (rtt < 250) break;  // good enough: at most 125 ms of error
    }
    if (best !== null) {
      clock.engine = best.engine; clock.perf = best.perf; clock.rtt = best.rtt;
      clock.synced = true;
    }
    return clock.synced;
  }

  /* ---- the API ---- */
  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  /* {status, body, retryAfter} for an answer; status 0 and network: true when no answer
   * came (offline, reset, or nothing within timeoutMs). Never throws. */
  async function api(method, path, opts) {
    opts = opts || {};
    var headers = Object.assign({}, opts.headers || {});
    if (opts.auth) headers["Authorization"] = "Bearer " + opts.auth;
    var init = { method: method, headers: headers, cache: opts.cache || "default",
                 credentials: "omit" };
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.json);
    }
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    if (ctrl) init.signal = ctrl.signal;
    var timer = ctrl ? setTimeout(function () { ctrl.abort(); }, opts.timeoutMs || 10000) : 0;
    try {
      var resp = await fetch(path, init);
      var ra = parseInt(resp.headers.get("Retry-After") || "", 10);
      var out = { status: resp.status, network: false, body: null,
                  retryAfter: isNaN(ra) ? null : ra, resp: resp };
      if (opts.blob) out.blob = resp.ok ? await resp.blob() : null;
      if (!opts.blob || !resp.ok) {
        var text = await resp.text();
        try { out.body = text ? JSON.parse(text) : null; } catch (e) { out.body = null; }
      }
      return out;
    } catch (e) {
      return { status: 0, network: true, body: null, retryAfter: null };
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  function errorOf(res) {
    return (res.body && res.body.error) || { code: res.network ? "network" : "unknown" };
  }

  function newKey() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    var b = new Uint8Array(16);
    window.crypto.getRandomValues(b);
    return Array.prototype.map.call(b, function (x) {
      return ("0" + x.toString(16)).slice(-2);
    }).join("");
  }

  /* ---- formatting, in the campaign's time zone ---- */
  var formats = {};
  function fmt(tz, kind) {
    var k = tz + "|" + kind;
    if (!formats[k]) {
      var o = { timeZone: tz, hour12: false };
      // short: 12/20 10:00, full: 12/20 10:00:00, date: 12/20, hm: 10:00, time: 10:00:00
      if (kind === "short" || kind === "full" || kind === "date") {
        o.month = "long"; o.day = "numeric";
      }
      if (kind !== "date") { o.hour = "2-digit"; o.minute = "2-digit"; }
      if (kind === "time" || kind === "full") o.second = "2-digit";
      formats[k] = new Intl.DateTimeFormat("zh-CN", o);
    }
    return formats[k];
  }
  function when(iso, tz, kind) {
    var t = typeof iso === "number" ? iso : Date.parse(iso);
    return isNaN(t) ? "" : fmt(tz, kind || "short").format(new Date(t));
  }

  /* The first instant of the engine's "today" in the campaign's time zone, as RFC 3339
   * (for GET /v1/venue/redemptions?since=). The offset is today's at this instant. */
  function startOfToday(tz) {
    var parts = {};
    new Intl.DateTimeFormat("en-CA", { timeZone: tz, year: "numeric", month: "2-digit",
                                       day: "2-digit", timeZoneName: "longOffset" })
      .formatToParts(new Date(engineNow()))
      .forEach(function (p) { parts[p.type] = p.value; });
    var off = (parts.timeZoneName || "GMT").replace("GMT", "") || "+00:00";
    return parts.year + "-" + parts.month + "-" + parts.day + "T00:00:00" + off;
  }

  function countdown(ms) {
    var s = Math.max(0, Math.ceil(ms / 1000));
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60), sec = s % 60;
    var two = function (n) { return (n < 10 ? "0" : "") + n; };
    return (d ? d + "天 " : "") + two(h) + ":" + two(m) + ":" + two(sec);
  }

  function yuan(fen) {
    return (fen % 100 === 0 ? String(fen / 100) : (fen / 100).toFixed(2)) + "元";
  }

  /* XXXX-XXXX-XXXX-XXXX-C, whatever form the code came in. */
  function displayCode(code) {
    var c = String(code).replace(/[^0-9A-Za-z]/g, "").toUpperCase();
    return c.length === 17 ? [c.slice(0, 4), c.slice(4, 8), c.slice(8, 12), c.slice(12, 16),
                              c.slice(16)].join("-") : String(code);
  }

  /* ---- DOM ---- */
  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) return;
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    });
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }
  function $(id) { return document.getElementById(id); }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  /* A confirmation in the page (window.confirm is blocked or ugly in app WebViews).
   * Resolves true only for the confirming button. */
  function confirmDialog(title, lines, okLabel, cancelLabel, danger) {
    return new Promise(function (resolve) {
      var overlay;
      function done(v) { document.body.removeChild(overlay); resolve(v); }
      var box = el("div", { class: "dialog-box", role: "dialog", "aria-modal": "true",
                            "aria-labelledby": "dialog-title" },
        el("h3", { id: "dialog-title", text: title }));
      lines.forEach(function (l) { box.appendChild(el("p", { text: l })); });
      box.appendChild(el("div", { class: "dialog-actions" },
        el("button", { type: "button", class: "secondary", id: "dialog-cancel",
                       text: cancelLabel, onclick: function () { done(false); } }),
        el("button", { type: "button", class: danger ? "danger" : "primary", id: "dialog-ok",
                       text: okLabel, onclick: function () { done(true); } })));
      overlay = el("div", { class: "dialog" }, box);
      document.body.appendChild(overlay);
      document.getElementById("dialog-cancel").focus();
    });
  }

  return { KIND: KIND, load: load, save: save, takeFromFragment: takeFromFragment,
           engineNow: engineNow, syncClock: syncClock, clock: clock, api: api,
           errorOf: errorOf, newKey: newKey, sleep: sleep, when: when,
           startOfToday: startOfToday, countdown: countdown, yuan: yuan,
           displayCode: displayCode, el: el, $: $, clear: clear,
           confirmDialog: confirmDialog };
})();
