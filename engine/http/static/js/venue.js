/* The venues' scanner page (/venue/). docs/pages.md: key, camera, decoder, answers. */
(function () {
  var el = CE.el, $ = CE.$;
  var KEY_KEY = "ce.venueKey", MODE_KEY = "ce.venueMode";
  // The same code read again within this time after its answer was dismissed is the
  // same coupon still in front of the camera, not a new scan.
  var SAME_CODE_MS = 3000, SCAN_EVERY_MS = 120, MAX_SIDE = 640;

  var S = {
    key: null, venue: null, campaign: null, venues: {}, mode: "confirm",
    busy: false, last: { code: "", at: 0 }, stream: null, scanTimer: 0, lastScan: 0,
    todayTimer: 0
  };

  /* ---- what staff are told (contract section 3, the venue rows) ---- */
  function tz() { return S.campaign ? S.campaign.timezone : "Asia/Shanghai"; }
  var ANSWER = {
    coupon_not_found: function () {
      return ["查无此券", "券码不存在或输错了。请核对后重新输入；仍查不到请拒收。"];
    },
    wrong_venue: function () {
      return ["非本场馆的券", "这张券属于其他场馆，本场馆不能核销。"];
    },
    already_redeemed: function (e) {
      return ["此券已核销", "已于 " + CE.when(e.redeemed_at, tz(), "full") + " 核销，不能重复使用。"];
    },
    coupon_void: function () {
      return ["此券已作废", "会员已退还这张券，不能使用。"];
    },
    coupon_not_yet_valid: function (e) {
      return ["此券尚未生效", (e.valid_from ? CE.when(e.valid_from, tz(), "short") + " 起" : "生效后") + "才能使用。"];
    },
    coupon_expired: function (e) {
      return ["此券已过期", e.valid_until ? "有效期至 " + CE.when(e.valid_until, tz(), "short") + "。" : "已过有效期。"];
    },
    rate_limited: function (e, res) {
      return ["无效券码过多", "一分钟内查不到的券码太多，请 " + ((res && res.retryAfter) || 60) +
                             " 秒后再试。"];
    },
    invalid_request: function () { return ["券码格式有误", "请核对后重新输入。"]; },
    unavailable: function () { return ["系统繁忙", "请稍后重试。"]; },
    network: function () { return ["网络不通", "请检查网络后重试。"]; }
  };

  function venueName(id) { return S.venues[id] ? S.venues[id].name : id; }

  /* ---- the full-screen answer ---- */
  function answer(kind, title, lines, coupon, actions) {
    var box = $("answer");
    CE.clear(box);
    box.className = "answer " + kind;
    box.appendChild(el("div", { class: "answer-icon", text: kind === "ok" ? "✓" : kind === "bad" ? "✗" : "?" }));
    box.appendChild(el("h2", { id: "answer-title", text: title }));
    lines.forEach(function (l) { if (l) box.appendChild(el("p", { text: l })); });
    if (coupon) box.appendChild(el("p", { class: "answer-code", text: CE.displayCode(coupon.code || coupon) }));
    var row = el("div", { class: "answer-actions" });
    (actions || []).forEach(function (a) { row.appendChild(a); });
    row.appendChild(el("button", { type: "button", id: "answer-dismiss",
                                   class: actions && actions.length ? "secondary" : "primary",
                                   text: actions && actions.length ? "取消" : "继续扫码",
                                   onclick: dismiss }));
    box.appendChild(row);
    box.hidden = false;
  }

  function refused(code, err, res) {
    var f = ANSWER[err.code] || ANSWER.unavailable;
    var t = f(err, res);
    if (err.code === "unauthorized") { signOut("核销密钥已失效或已被撤销，请重新输入。"); return; }
    answer("bad", t[0], [t[1]], code);
  }

  function dismiss() {
    $("answer").hidden = true;
    S.busy = false;
    S.last.at = Date.now();
    var input = $("manual-code");
    if (input) input.value = "";
  }

  /* ---- look, then redeem ---- */
  async function handleCode(text) {
    if (S.busy) return;
    S.busy = true;
    S.last = { code: text, at: Date.now() };
    answer("wait", "正在查询…", [], text);
    if (S.mode === "immediate") { await redeem(text); return; }
    var res = await CE.api("GET", "/v1/venue/coupons/" + encodeURIComponent(text),
                           { auth: S.key, cache: "no-store" });
    if (res.status !== 200) { refused(text, CE.errorOf(res), res); return; }
    var c = res.body.coupon;
    if (c.status === "redeemed") {
      refused(c.code, { code: "already_redeemed", redeemed_at: c.redeemed_at });
      return;
    }
    if (c.status === "void") { refused(c.code, { code: "coupon_void" }); return; }
    answer("ask", "确认核销这张券？", [
      venueName(c.venue_id) + " · 第 " + c.round_id + " 场 · 抵扣 " + CE.yuan(c.face_value_fen),
      "有效期 " + CE.when(c.valid_from, tz()) + " – " + CE.when(c.valid_until, tz()),
      "核销后不能撤销。"
    ], c, [el("button", { type: "button", id: "redeem", class: "primary big",
                          text: "确认核销", onclick: function () { redeem(c.code); } })]);
  }

  async function redeem(code) {
    answer("wait", "正在核销…", [], code);
    var startedAt = CE.engineNow();
    var res = await CE.api("POST", "/v1/venue/redemptions", { auth: S.key, json: { code: code } });
    if (res.network || res.status === 503) {
      // The reply may be lost after the redemption happened: look before saying anything.
      // Redeemed here since just before this attempt = this attempt (docs/decisions.md).
      await CE.sleep(500 + Math.random() * 500);
      var look = await CE.api("GET", "/v1/venue/coupons/" + encodeURIComponent(code),
                              { auth: S.key, cache: "no-store" });
      var lc = look.status === 200 ? look.body.coupon : null;
      if (lc && lc.status === "redeemed" && Date.parse(lc.redeemed_at) >= startedAt - 5000) {
        res = { status: 200, body: { coupon: lc } };
      } else if (lc && lc.status === "issued") {
        answer("bad", "网络中断，未核销", ["这张券还没有核销，请重试。"], code,
               [el("button", { type: "button", class: "primary big", text: "重试核销",
                               onclick: function () { redeem(code); } })]);
        return;
      } else if (look.status !== 200 && look.status !== 0 && look.status !== 503) {
        refused(code, CE.errorOf(look), look);
        return;
      } else if (lc === null) {
        refused(code, CE.errorOf(res), res);
        return;
      } else {
        res = { status: 409, body: { error: { code: lc.status === "void" ? "coupon_void" : "already_redeemed",
                                              redeemed_at: lc.redeemed_at } } };
      }
    }
    if (res.status === 200) {
      var c = res.body.coupon;
      answer("ok", "核销成功", ["抵扣 " + CE.yuan(c.face_value_fen) + " · " + venueName(c.venue_id),
                               "核销时间 " + CE.when(c.redeemed_at, tz(), "full")], c);
      loadToday();
      return;
    }
    refused(code, CE.errorOf(res), res);
  }

  /* ---- the camera: decode every frame or so with jsQR (vendored, docs/pages.md) ---- */
  async function startCamera() {
    var status = $("camera-status");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      status.textContent = "此浏览器不能使用摄像头，请用下方手动输入。";
      return;
    }
    try {
      S.stream = await navigator.mediaDevices.getUserMedia({
        audio: false, video: { facingMode: { ideal: "environment" },
                               width: { ideal: 1280 }, height: { ideal: 720 } } });
    } catch (e) {
      status.textContent = "无法打开摄像头（" + (e && e.name || "未知原因") +
                           "）。请允许使用摄像头，或用下方手动输入。";
      $("camera-start").hidden = false;
      return;
    }
    var video = $("camera");
    video.srcObject = S.stream;
    try { await video.play(); } catch (e) { /* autoplay of a muted stream is allowed */ }
    $("camera-start").hidden = true;
    status.textContent = "请将会员的券码二维码对准取景框";
    scanLoop();
  }

  function stopCamera() {
    if (S.stream) S.stream.getTracks().forEach(function (t) { t.stop(); });
    S.stream = null;
  }

  var canvas = null, ctx = null;
  function scanLoop() {
    if (!S.stream) return;
    requestAnimationFrame(scanLoop);
    var t = performance.now();
    if (S.busy || document.hidden || t - S.lastScan < SCAN_EVERY_MS) return;
    S.lastScan = t;
    var video = $("camera");
    var w = video.videoWidth, h = video.videoHeight;
    if (!w || !h) return;
    var scale = Math.min(1, MAX_SIDE / Math.max(w, h));
    w = Math.round(w * scale); h = Math.round(h * scale);
    if (!canvas) {
      canvas = document.createElement("canvas");
      ctx = canvas.getContext("2d", { willReadFrequently: true });
    }
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    ctx.drawImage(video, 0, 0, w, h);
    var found = jsQR(ctx.getImageData(0, 0, w, h).data, w, h, { inversionAttempts: "dontInvert" });
    if (!found || !found.data) return;
    var text = found.data.trim();
    if (text === S.last.code && Date.now() - S.last.at < SAME_CODE_MS) return;
    handleCode(text);
  }

  /* ---- today's redemptions, for the end-of-day check against the till ---- */
  async function loadToday() {
    clearTimeout(S.todayTimer);
    var since = CE.startOfToday(tz()), seen = {}, rows = [];
    // Oldest first, at most 1,000 an answer: page from the last redeemed_at (inclusive).
    for (var page = 0; page < 20; page++) {
      var res = await CE.api("GET", "/v1/venue/redemptions?since=" + encodeURIComponent(since),
                             { auth: S.key, cache: "no-store" });
      if (res.status === 401) { signOut("核销密钥已失效或已被撤销，请重新输入。"); return; }
      if (res.status !== 200) break;
      var batch = res.body.redemptions, fresh = 0;
      batch.forEach(function (c) { if (!seen[c.code]) { seen[c.code] = true; rows.push(c); fresh++; } });
      if (batch.length < 1000 || fresh === 0) break;
      since = batch[batch.length - 1].redeemed_at;
    }
    $("today-count").textContent = String(rows.length);
    var list = $("today");
    CE.clear(list);
    rows.slice().reverse().forEach(function (c) {
      list.appendChild(el("li", { "data-code": c.code },
        el("span", { class: "today-time", text: CE.when(c.redeemed_at, tz(), "time") }),
        el("span", { class: "today-code", text: CE.displayCode(c.code) }),
        el("span", { class: "today-value", text: CE.yuan(c.face_value_fen) })));
    });
    if (!document.hidden) S.todayTimer = setTimeout(loadToday, 60000);
  }

  /* ---- the key: typed or pasted once, kept on this device ---- */
  async function useKey(key, fromForm) {
    var res = await CE.api("GET", "/v1/venue/me", { auth: key, cache: "no-store" });
    if (res.status === 200) {
      S.key = key;
      S.venue = res.body.venue;
      CE.save(KEY_KEY, key);
      showMain();
      return;
    }
    if (res.status === 401) {
      CE.save(KEY_KEY, null);
      showKeyForm(fromForm ? "密钥无效或已被撤销，请核对后重新输入。" : "保存的密钥已失效，请重新输入。");
    } else {
      showKeyForm("网络繁忙，暂时无法验证密钥，请稍后再试。");
      if (!fromForm) setTimeout(function () { useKey(key, false); }, 5000);
    }
  }

  function showKeyForm(message) {
    $("main").hidden = true;
    $("key-section").hidden = false;
    $("key-error").textContent = message || "";
    $("key-error").hidden = !message;
  }

  function showMain() {
    $("key-section").hidden = true;
    $("main").hidden = false;
    $("venue-name").textContent = S.venue.name;
    $("venue-meta").textContent = (CE.KIND[S.venue.kind] || S.venue.kind) + " · " + S.venue.city;
    $("mode-immediate").checked = S.mode === "immediate";
    startCamera();
    loadToday();
  }

  async function signOut(message) {
    stopCamera();
    clearTimeout(S.todayTimer);
    CE.save(KEY_KEY, null);
    S.key = null; S.venue = null; S.busy = false;
    $("answer").hidden = true;
    showKeyForm(message);
  }

  async function askSignOut() {
    var ok = await CE.confirmDialog("退出核销？", ["退出后需要重新输入核销密钥才能继续核销。"],
                                    "退出", "取消", true);
    if (ok) signOut();
  }

  function start() {
    CE.takeFromFragment("key", KEY_KEY);
    S.mode = CE.load(MODE_KEY) === "immediate" ? "immediate" : "confirm";
    $("key-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var key = $("key-input").value.trim();
      if (key) useKey(key, true);
    });
    $("manual-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var text = $("manual-code").value.trim();
      if (text) handleCode(text);
    });
    $("mode-immediate").addEventListener("change", function (ev) {
      S.mode = ev.target.checked ? "immediate" : "confirm";
      CE.save(MODE_KEY, S.mode);
    });
    $("sign-out").addEventListener("click", askSignOut);
    $("camera-start").addEventListener("click", startCamera);
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && S.key) { CE.syncClock(1); loadToday(); }
    });
    Promise.all([CE.api("GET", "/v1/campaign"), CE.syncClock(3)]).then(function (r) {
      if (r[0].status === 200) {
        S.campaign = r[0].body.campaign;
        S.campaign.venues.forEach(function (v) { S.venues[v.venue_id] = v; });
      }
      var key = CE.load(KEY_KEY);
      if (key) useKey(key, false); else showKeyForm("");
      document.body.setAttribute("data-ready", "1");
    });
  }

  start();
})();
