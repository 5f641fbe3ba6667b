// CTF instancer dashboard: plain JS, no build step. Talks to the API of SPEC §6 with
// "Authorization: Bearer <token>" only; the token lives in sessionStorage, never in a URL
// query string. Everything the API returns is written with textContent, never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "ctf.token";
  const REFRESH_MS = 5000;
  const AUDIT_ROWS = 50; // the newest events the organiser dashboard shows
  const TASK_POLL_MS = 400;
  const TASK_TIMEOUT_MS = 15 * 60 * 1000; // big images can take a while to pull

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

  const state = {
    token: null,
    role: null, // "admin" | "team"
    team: null,
    challenges: [], // catalog
    instances: new Map(), // team view: challenge -> instance
    busy: new Map(), // team view: challenge -> {op, phase, text, pct}
    errors: new Map(), // team view: challenge -> message
    all: [], // admin view: every instance
    rowBusy: new Map(), // admin view: "team/challenge" -> text
    skewMs: 0, // server clock minus ours
    timers: [],
  };

  // -- errors, in words -------------------------------------------------------------------

  const TITLES = {
    unauthorized: "This token is not valid.",
    forbidden: "This token may not do that.",
    shared_instance: "This instance is shared by every team: only the organisers stop it.",
    invalid_request: "The request was not accepted.",
    invalid_team_id: "That team id is not valid.",
    unknown_challenge: "This challenge is not in the catalog.",
    instance_not_found: "There is no such instance (any more).",
    task_not_found: "The operation could not be followed.",
    team_quota_exceeded: "Your team already runs as many instances as it may.",
    max_lifetime_reached: "This instance cannot be extended any further.",
    rate_limited: "Too many requests in a short time.",
    capacity_exhausted: "The CTF is out of room for new instances right now.",
    backend_unavailable: "The service is briefly unavailable.",
    start_failed: "The challenge failed to start.",
    task_failed: "The operation failed.",
  };

  class ApiError extends Error {
    constructor(status, code, detail) {
      const title = TITLES[code] || (status === 0 ? "Cannot reach the server." : "Something went wrong.");
      let text = detail ? `${title} ${sentence(detail)}` : title;
      super(text);
      this.status = status;
      this.code = code;
    }
  }

  function sentence(text) {
    const t = String(text).trim();
    const first = t.charAt(0).toUpperCase() + t.slice(1);
    return /[.!?]$/.test(first) ? first : `${first}.`;
  }

  function fromTaskError(err) {
    return new ApiError(503, err && err.error, err && err.detail);
  }

  // -- HTTP -------------------------------------------------------------------------------

  async function api(method, path, { allow = [] } = {}) {
    let res;
    try {
      res = await fetch(path, {
        method,
        headers: { Authorization: `Bearer ${state.token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (_e) {
      throw new ApiError(0, "network", "Check your connection; the page keeps trying.");
    }
    noteClock(res);
    let body = null;
    try {
      body = await res.json();
    } catch (_e) {
      body = null;
    }
    if (!res.ok && !allow.includes(res.status)) {
      const err = new ApiError(res.status, body && body.error, body && body.detail);
      if (res.status === 401 && state.role) expire(err.message);
      throw err;
    }
    return { status: res.status, body };
  }

  function noteClock(res) {
    const date = Date.parse(res.headers.get("Date") || "");
    if (Number.isNaN(date)) return;
    const skew = date - Date.now();
    // The header has a one-second resolution: only correct clocks that are clearly off.
    state.skewMs = Math.abs(skew) > 2000 ? skew : 0;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // Poll a task until it finishes; report its progress; return its result or throw its error.
  async function followTask(taskId, onProgress) {
    const began = Date.now();
    for (;;) {
      const { body } = await api("GET", `/api/v1/tasks/${encodeURIComponent(taskId)}`);
      if (body.state === "SUCCESS") return body.result;
      if (body.error) throw fromTaskError(body.error);
      if (onProgress) onProgress(body, Date.now() - began);
      if (Date.now() - began > TASK_TIMEOUT_MS) {
        throw new ApiError(0, "timeout", "The operation is taking very long; it may still finish. Reload to see.");
      }
      await sleep(TASK_POLL_MS);
    }
  }

  // -- formatting -------------------------------------------------------------------------

  function remaining(expiresAt) {
    return Math.floor((Date.parse(expiresAt) - (Date.now() + state.skewMs)) / 1000);
  }

  function clock(seconds) {
    if (seconds <= 0) return "expired";
    const h = Math.floor(seconds / 3600);
    const m = Math.floor((seconds % 3600) / 60);
    const s = seconds % 60;
    const ss = String(s).padStart(2, "0");
    return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
  }

  function duration(seconds) {
    if (!seconds) return "";
    if (seconds < 60) return `${seconds} s`;
    if (seconds % 3600 === 0) return `${seconds / 3600} h`;
    if (seconds >= 3600) return `${(seconds / 3600).toFixed(1)} h`;
    return `${Math.round(seconds / 60)} min`;
  }

  function bytes(n) {
    if (!n) return "0 MB";
    return n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : `${(n / 1e6).toFixed(1)} MB`;
  }

  const STATUS_TEXT = {
    none: "Not running",
    starting: "Starting…",
    running: "Running",
    stopping: "Stopping…",
    failed: "Failed",
  };

  function safeUrl(url) {
    try {
      const u = new URL(url);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : null;
    } catch (_e) {
      return null;
    }
  }

  // "tcp://host:port" (no browser can open it) as "host:port", to copy into nc or a client;
  // behind the ingress "tls://host:port" (TLS with SNI) as the command that reaches it.
  function tcpAddress(url) {
    const m = /^tcp:\/\/([^/\s]+)$/.exec(url || "");
    if (m) return m[1];
    const t = /^tls:\/\/([A-Za-z0-9.-]+):(\d+)$/.exec(url || "");
    return t ? `openssl s_client -quiet -connect ${t[1]}:${t[2]} -servername ${t[1]}`
      + `  (or: ncat --ssl ${t[1]} ${t[2]})` : null;
  }

  // Behind the ingress's team gate an instance opens through its short-lived access link
  // (it sets the access cookie, then shows the challenge); without it, through its URL.
  function openUrl(inst) {
    return safeUrl(inst && inst.access_url) || safeUrl(inst && inst.url);
  }

  // A Compose instance's endpoints (SPEC §12) when it has several; null for one endpoint
  // (an instance of one image, or a Compose file with one port): its url says it all.
  function endpointsOf(inst) {
    const eps = inst && Array.isArray(inst.endpoints) ? inst.endpoints : [];
    return eps.length > 1 ? eps : null;
  }

  // One endpoint as a list item: its service and port, then its own link (web; behind the
  // ingress its access link) or its address to copy (tcp).
  function endpointItem(ep, short) {
    const li = document.createElement("li");
    li.className = "endpoint";
    li.dataset.service = String(ep.service);
    li.dataset.port = String(ep.port);
    const name = document.createElement("span");
    name.className = "ep-name";
    name.textContent = `${ep.service}:${ep.port}`;
    const href = safeUrl(ep.url);
    let value;
    if (href) {
      value = document.createElement("a");
      value.className = "url";
      value.target = "_blank";
      value.rel = "noopener noreferrer";
      value.href = safeUrl(ep.access_url) || href;
      value.textContent = (short ? href.replace(/^https?:\/\//, "") : href).replace(/\/$/, "");
    } else {
      value = document.createElement("code");
      value.className = "addr";
      const tcp = tcpAddress(ep.url);
      value.textContent = tcp ? (short && !ep.url.startsWith("tls:") ? `${tcp} (tcp)` : tcp)
        : "not reachable";
    }
    li.append(name, " ", value);
    return li;
  }

  // Fill a list with the endpoints; untouched when they did not change, so a refresh keeps
  // a keyboard user's focus on a link.
  function fillEndpoints(list, eps, short) {
    const sig = eps ? JSON.stringify(eps) : "";
    if (list.dataset.sig === sig) return;
    list.dataset.sig = sig;
    list.replaceChildren(...(eps || []).map((ep) => endpointItem(ep, short)));
  }

  // A TCP instance's connection lines (connect.js), each with a Copy button; untouched when
  // the address did not change, so a refresh keeps a selection or a focused button.
  function fillConnect(fact, url) {
    const lines = url && window.ctfConnectLines ? window.ctfConnectLines(url) : [];
    fact.hidden = lines.length === 0;
    const list = $("ul.connect", fact);
    if (list.dataset.url === (url || "")) return;
    list.dataset.url = url || "";
    list.replaceChildren(...lines.map(({ tool, line }) => {
      const li = document.createElement("li");
      li.dataset.tool = tool;
      const code = document.createElement("code");
      code.textContent = line;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Copy";
      button.setAttribute("aria-label", `Copy the ${tool} line`);
      button.addEventListener("click", async () => {
        try {
          await navigator.clipboard.writeText(line);
          announce(`The ${tool} line was copied to the clipboard.`);
        } catch (_e) {
          getSelection().selectAllChildren(code);
          announce("Press Ctrl+C to copy the selected line.");
        }
      });
      li.append(code, button);
      return li;
    }));
  }

  function setCountdown(el, expiresAt) {
    if (!expiresAt) {
      el.textContent = "";
      el.removeAttribute("datetime");
      delete el.dataset.expires;
      return;
    }
    if (expiresAt.startsWith("9999-")) {  // a shared (global) instance: it never expires
      el.textContent = "never (shared by every team)";
      el.removeAttribute("datetime");
      delete el.dataset.expires;
      return;
    }
    el.dataset.expires = expiresAt;
    el.setAttribute("datetime", expiresAt);
    el.title = `until ${new Date(Date.parse(expiresAt)).toLocaleString()}`;
    tickOne(el);
  }

  function tickOne(el) {
    const left = remaining(el.dataset.expires);
    el.textContent = clock(left);
    el.classList.toggle("soon", left < 300);
  }

  function tick() {
    $$("time.countdown[data-expires]").forEach(tickOne);
  }

  let announceTimer = null;
  function announce(text) {
    const live = $("#announce");
    live.textContent = "";
    clearTimeout(announceTimer);
    // A fresh text node after a beat, so repeated messages are read out again.
    announceTimer = setTimeout(() => { live.textContent = text; }, 50);
  }

  function showError(el, message) {
    el.textContent = message || "";
    el.hidden = !message;
  }

  // -- token and view selection -----------------------------------------------------------

  function tokenFromFragment() {
    const hash = window.location.hash.replace(/^#/, "");
    if (!hash) return null;
    const token = new URLSearchParams(hash).get("token");
    if (token !== null) {
      // Drop the fragment at once: it must not linger in the address bar or history.
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    return token ? token.trim() : null;
  }

  function teamOf(token) {
    const dot = token.lastIndexOf(".");
    return dot > 0 ? token.slice(0, dot) : null;
  }

  async function signIn(token, { fromForm = false } = {}) {
    stopTimers();
    state.token = token;
    let view;
    try {
      // An admin-only route: 200 for organisers, 403 for a team, 401 for a bad token.
      const { status, body } = await api("GET", "/api/v1/capacity", { allow: [403] });
      view = status === 403 ? "team" : "admin";
      state.capacity = status === 200 ? body : null;
    } catch (err) {
      state.token = null;
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(err.status === 401
        ? "That token is not valid. Check it, or ask the organisers for your team's link."
        : err.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    state.role = view;
    state.team = view === "team" ? teamOf(token) : null;
    $("#login-view").hidden = true;
    $("#who").hidden = false;
    $("#who-label").textContent = view === "admin" ? "Organiser" : `Team ${state.team}`;
    if (view === "team") await showTeam();
    else await showAdmin();
    if (fromForm) $("#main").focus();
    announce(view === "admin" ? "Signed in as organiser." : `Signed in as team ${state.team}.`);
  }

  function showLogin(message) {
    state.role = null;
    state.team = null;
    stopTimers();
    $("#who").hidden = true;
    $("#team-view").hidden = true;
    $("#admin-view").hidden = true;
    $("#login-view").hidden = false;
    showError($("#login-error"), message);
    const input = $("#token-input");
    input.value = "";
    input.setAttribute("aria-invalid", message ? "true" : "false");
    input.focus();
  }

  function expire(message) {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(`Your session ended: ${message}`);
  }

  function signOut() {
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    state.instances.clear();
    state.busy.clear();
    state.errors.clear();
    state.all = [];
    $("#cards").replaceChildren();
    $("#instances tbody").replaceChildren();
    showLogin("");
    announce("Signed out.");
  }

  function every(ms, fn) {
    state.timers.push(setInterval(fn, ms));
  }

  function stopTimers() {
    state.timers.forEach(clearInterval);
    state.timers = [];
  }

  async function loadCatalog() {
    const { body } = await api("GET", "/api/v1/challenges");
    state.challenges = body.challenges;
  }

  // -- team view --------------------------------------------------------------------------

  async function showTeam() {
    $("#admin-view").hidden = true;
    $("#team-view").hidden = false;
    document.title = `Team ${state.team} · CTF instances`;
    try {
      await loadCatalog();
      buildCards();
      await refreshTeam();
    } catch (err) {
      showError($("#team-error"), err.message);
    }
    every(REFRESH_MS, () => { refreshTeam().catch(() => {}); });
    every(1000, tick);
  }

  function buildCards() {
    const tpl = $("#card-template");
    const cards = state.challenges.map((ch) => {
      const card = tpl.content.firstElementChild.cloneNode(true);
      const titleId = `title-${ch.id}`;
      card.dataset.challenge = ch.id;
      card.setAttribute("aria-labelledby", titleId);
      const title = $(".card-title", card);
      title.id = titleId;
      title.textContent = ch.name || ch.id;
      const parts = [ch.protocol === "tcp" ? "TCP service" : "Web application"];
      if (ch.ttl) parts.push(`runs ${duration(ch.ttl)} per start`);
      if (ch.max_lifetime) parts.push(`extendable up to ${duration(ch.max_lifetime)}`);
      $(".meta", card).textContent = parts.join(" · ");
      $$("button", card).forEach((b) => b.setAttribute("aria-describedby", titleId));
      return card;
    });
    $("#cards").replaceChildren(...cards);
  }

  async function refreshTeam() {
    const { body } = await api("GET", `/api/v1/teams/${encodeURIComponent(state.team)}/instances`);
    state.instances = new Map(body.instances.map((i) => [i.challenge, i]));
    showError($("#team-error"), "");
    renderCards();
  }

  function renderCards() {
    state.challenges.forEach((ch) => renderCard(ch));
  }

  function cardOf(id) {
    return $(`article[data-challenge="${CSS.escape(id)}"]`);
  }

  function renderCard(ch) {
    const card = cardOf(ch.id);
    if (!card) return;
    const inst = state.instances.get(ch.id);
    const busy = state.busy.get(ch.id);
    let status = inst ? inst.status : "none";
    if (busy && busy.op === "start" && status !== "running") status = "starting";
    if (busy && busy.op === "stop") status = "stopping";
    card.dataset.status = status;

    const badge = $(".badge", card);
    badge.dataset.status = status;
    badge.textContent = STATUS_TEXT[status] || status;

    const shownInst = inst && inst.status === "running" && !(busy && busy.op === "stop") ? inst : null;
    const eps = endpointsOf(shownInst);
    $(".fact-endpoints", card).hidden = !eps;
    fillEndpoints($("ul.endpoints", card), eps, false);
    const shown = shownInst && !eps ? shownInst.url : null;
    const href = safeUrl(shown);
    const tcp = href ? null : tcpAddress(shown);
    const link = $(".fact-url a.url", card);
    const addr = $(".fact-url code.addr", card);
    $(".fact-url", card).hidden = !href && !tcp;
    addr.hidden = !tcp;
    addr.textContent = tcp || "";
    fillConnect($(".fact-connect", card), tcp ? shown : null);
    if (href) {
      link.href = openUrl(shownInst);
      link.textContent = href.replace(/\/$/, "");
    } else {
      link.removeAttribute("href");
      link.textContent = "";
    }
    const live = inst && (inst.status === "running" || inst.status === "starting");
    $(".fact-exp", card).hidden = !live;
    setCountdown($("time.countdown", card), live ? inst.expires_at : null);

    const progress = $(".progress", card);
    progress.hidden = !busy;
    if (busy) {
      const bar = $("progress", progress);
      if (busy.pct === undefined) bar.removeAttribute("value");
      else bar.value = busy.pct;
      bar.setAttribute("aria-label", busy.text);
      $(".progress-text", progress).textContent = busy.text;
      const order = ["queued", "image", "pulling", "creating", "starting", "running"];
      const at = order.indexOf(busy.phase === "pulling" ? "image" : busy.phase);
      $$(".steps li", progress).forEach((li) => {
        const i = order.indexOf(li.dataset.step);
        li.classList.toggle("done", at > i);
        li.classList.toggle("current", at === i);
      });
      $(".steps", progress).hidden = busy.op !== "start" && busy.op !== "restart";
    }

    const message = state.errors.get(ch.id) || (inst && inst.status === "failed" && inst.error
      ? `The last start failed. ${sentence(inst.error)}` : "");
    showError($(".error", card), message);

    const btn = (a) => $(`button[data-action="${a}"]`, card);
    btn("start").disabled = !!busy || (inst && inst.status !== "failed");
    btn("stop").disabled = !!busy || !inst || inst.status === "stopping";
    btn("extend").disabled = !!busy || !inst || inst.status !== "running";
    btn("restart").disabled = !!busy || !inst || inst.status === "stopping";
    // A share: global challenge's one instance (team id "global") is every team's: the
    // workers keep it up and only the organisers stop it (SPEC §13).
    const shared = !!inst && inst.team_id === "global";
    btn("stop").hidden = shared;
    btn("extend").hidden = shared;
    btn("restart").hidden = shared;
  }

  function progressOf(view, waitedMs) {
    const p = view.progress || {};
    const phase = p.phase || (view.state === "PENDING" ? "queued" : "starting");
    switch (phase) {
      case "queued":
        return { phase, text: waitedMs > 10000 ? "Waiting for a free worker…" : "Queued…" };
      case "image":
        return { phase, text: "Checking the challenge image…" };
      case "pulling": {
        const layers = p.layers_total ? `${p.layers_done} of ${p.layers_total} layers` : "";
        const size = p.bytes_total ? `${bytes(p.bytes_done)} of ${bytes(p.bytes_total)}` : "";
        const pct = p.bytes_total ? Math.min(100, Math.round((100 * p.bytes_done) / p.bytes_total)) : undefined;
        return { phase, pct, text: `Downloading the image${layers || size ? ": " : "…"}${[layers, size].filter(Boolean).join(", ")}` };
      }
      case "creating":
        return { phase, text: "Creating your container…" };
      case "starting":
        return { phase, text: "Waiting for the challenge to answer…" };
      case "running":
        return { phase, text: "Ready." };
      default:
        return { phase, text: "Working…" };
    }
  }

  function nameOf(id) {
    const ch = state.challenges.find((c) => c.id === id);
    return ch ? ch.name || ch.id : id;
  }

  function teamPath(id) {
    return `/api/v1/teams/${encodeURIComponent(state.team)}/instances/${encodeURIComponent(id)}`;
  }

  // Run one start/stop/restart/extend for a card: busy state, errors in words, focus kept.
  async function runCardOp(id, op, work, focusAfter) {
    const ch = state.challenges.find((c) => c.id === id);
    const card = cardOf(id);
    const hadFocus = card && card.contains(document.activeElement);
    state.errors.delete(id);
    const setBusy = (b) => { state.busy.set(id, { op, ...b }); renderCard(ch); };
    setBusy(op === "start" || op === "restart" ? { phase: "queued", text: "Queued…" }
      : { phase: op, text: op === "stop" ? "Stopping…" : "Extending…" });
    try {
      await work(setBusy);
    } catch (err) {
      if (err.code === "instance_not_found") state.instances.delete(id);
      state.errors.set(id, err.message);
      announce(`${nameOf(id)}: ${err.message}`);
    } finally {
      state.busy.delete(id);
      renderCard(ch);
      if (hadFocus && (!document.activeElement || document.activeElement === document.body)) {
        const target = $(`button[data-action="${focusAfter}"]`, card);
        (target && !target.disabled ? target : card.querySelector("button:not(:disabled)") || card).focus();
      }
      refreshTeam().catch(() => {});
    }
  }

  function start(id) {
    return runCardOp(id, "start", async (setBusy) => {
      const { body } = await api("PUT", teamPath(id));
      state.instances.set(id, { ...body, status: body.status === "running" ? "running" : "starting" });
      let lastPhase = null;
      const inst = await followTask(body.task_id, (view, waited) => {
        const b = progressOf(view, waited);
        if (b.phase !== lastPhase) {
          lastPhase = b.phase;
          if (b.phase !== "queued") announce(`${nameOf(id)}: ${b.text}`);
        }
        setBusy(b);
      });
      state.instances.set(id, inst);
      // Behind the ingress the API mints a fresh access link in every listing (a task's
      // result has none): fetch it now so Open works at once.
      if (!inst.access_url) await refreshTeam().catch(() => {});
      announce(`${nameOf(id)} is running at ${inst.url}.`);
    }, "stop");
  }

  function stop(id) {
    return runCardOp(id, "stop", async () => {
      const { body } = await api("DELETE", teamPath(id));
      await followTask(body.task_id);
      state.instances.delete(id);
      announce(`${nameOf(id)} is stopped.`);
    }, "start");
  }

  // A fresh instance in place of this one (same flag, new expiry): what the team changed in
  // it is lost, so ask first.
  function restart(id) {
    if (!window.confirm(`Restart ${nameOf(id)}? You get a fresh instance: everything changed in this one is lost.`)) {
      return Promise.resolve();
    }
    return runCardOp(id, "restart", async (setBusy) => {
      const { body } = await api("POST", `${teamPath(id)}/restart`);
      state.instances.set(id, { ...body, status: "starting" });
      const inst = await followTask(body.task_id, (view, waited) => setBusy(progressOf(view, waited)));
      state.instances.set(id, inst);
      if (!inst.access_url) await refreshTeam().catch(() => {});
      announce(`${nameOf(id)} was restarted: a fresh instance runs at ${inst.url}.`);
    }, "restart");
  }

  function extend(id) {
    return runCardOp(id, "extend", async () => {
      const { status, body } = await api("POST", `${teamPath(id)}/extend`);
      const inst = status === 202 ? await followTask(body.task_id) : body;
      state.instances.set(id, inst);
      announce(`${nameOf(id)} now expires in ${clock(remaining(inst.expires_at))}.`);
    }, "extend");
  }

  // -- admin view -------------------------------------------------------------------------

  async function showAdmin() {
    $("#team-view").hidden = true;
    $("#admin-view").hidden = false;
    document.title = "Organiser · CTF instances";
    try {
      await loadCatalog();
      const select = $("#f-challenge");
      const keep = select.value;
      select.replaceChildren(new Option("All challenges", ""),
        ...state.challenges.map((c) => new Option(c.name && c.name !== c.id ? `${c.name} (${c.id})` : c.id, c.id)));
      select.value = keep;
    } catch (err) {
      showError($("#admin-error"), err.message);
    }
    if (state.capacity) renderCapacity(state.capacity);
    await refreshAdmin();
    every(REFRESH_MS, () => { refreshAdmin(); });
    every(1000, tick);
  }

  async function refreshAdmin() {
    const jobs = [
      api("GET", "/api/v1/instances").then(({ body }) => { state.all = body.instances; renderRows(); }),
      api("GET", "/api/v1/capacity").then(({ body }) => renderCapacity(body)),
      api("GET", "/healthz", { allow: [503] }).then(({ body }) => renderHealth(body)),
      api("GET", "/api/v1/pools").then(({ body }) => renderPools(body.pools || [])),
      api("GET", `/api/v1/audit?limit=${AUDIT_ROWS}`).then(({ body }) => renderAudit(body.events || [])),
      api("GET", "/api/v1/health/challenges").then(({ body }) => renderChecks(body.challenges || [])),
    ];
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r) => r.status === "rejected");
    showError($("#admin-error"), failed ? failed.reason.message : "");
    if (results[2].status === "rejected") renderHealth(null);
  }

  function renderCapacity(cap) {
    $("#cap-used").textContent = String(cap.used);
    $("#cap-limit").textContent = String(cap.limit);
    const meter = $("#cap-meter");
    meter.max = cap.limit;
    meter.low = Math.round(cap.limit * 0.7);
    meter.high = Math.round(cap.limit * 0.9);
    meter.value = cap.used;
    $("#cap-note").textContent = `instances in use · at most ${cap.per_team_limit} per team`;
    const hosts = cap.hosts || [];
    $("#cap-hosts").replaceChildren(...(hosts.length > 1 ? hosts.map((h) => {
      const li = document.createElement("li");
      li.dataset.host = h.host;
      const name = document.createElement("span");
      name.textContent = h.host;
      const n = document.createElement("span");
      const max = h.max || h.limit;
      n.textContent = (max ? `${h.used} / ${max}` : String(h.used))
        + (h.alive === false ? " · worker down" : "");
      li.dataset.alive = String(h.alive !== false);
      li.append(name, n);
      return li;
    }) : []));
  }

  // Warm pools (issue 14): one line per pool, hidden while no challenge has one.
  function renderPools(pools) {
    $("#pools-tile").hidden = pools.length === 0;
    $("#pools").replaceChildren(...pools.map((p) => {
      const li = document.createElement("li");
      li.dataset.pool = `${p.host}/${p.challenge}`;
      const name = document.createElement("span");
      name.textContent = p.host === "local" ? p.challenge : `${p.challenge} @ ${p.host}`;
      const n = document.createElement("span");
      n.textContent = `${p.ready} / ${p.size} ready · ${p.claims} claims · ${p.misses} misses`;
      li.dataset.alive = String(p.ready > 0 || p.size === 0);
      li.append(name, n);
      return li;
    }));
  }

  // The solvers' verdicts (SPEC §14): one row per challenge with a solver, hidden while none
  // has one. A broken challenge is marked and its last output lines shown (opened at once);
  // what the organiser opens or closes stays so across refreshes.
  const CHECK_TEXT = { ok: "OK", broken: "BROKEN", unknown: "not run yet" };
  const CHECK_STATUS = { ok: "running", broken: "failed", unknown: "starting" };

  function renderChecks(rows) {
    $("#checks-panel").hidden = rows.length === 0;
    const broken = rows.filter((r) => r.state === "broken").length;
    $("#checks-count").textContent = rows.length === 0 ? ""
      : broken ? `(${broken} of ${rows.length} broken)` : `(${rows.length})`;
    const tbody = $("#checks tbody");
    const opened = new Map($$("tr", tbody).map((tr) => [tr.dataset.challenge,
      [tr.dataset.state, $("details", tr) ? $("details", tr).open : false]]));
    $("#checks tbody").replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.challenge = r.challenge;
      tr.dataset.state = r.state;
      const name = document.createElement("td");
      name.className = "c-challenge";
      name.textContent = nameOf(r.challenge) !== r.challenge
        ? `${nameOf(r.challenge)} (${r.challenge})` : r.challenge;
      const health = document.createElement("td");
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.dataset.status = CHECK_STATUS[r.state] || "starting";
      badge.textContent = CHECK_TEXT[r.state] || r.state;
      health.append(badge);
      const when = document.createElement("td");
      when.textContent = r.last_run ? String(r.last_run).replace("T", " ").replace(/Z$/, "") : "–";
      const host = document.createElement("td");
      host.className = "c-host";
      host.textContent = r.host || "–";
      const out = document.createElement("td");
      out.className = "c-output";
      const lines = r.output || [];
      if (lines.length) {
        const details = document.createElement("details");
        const before = opened.get(r.challenge);
        // Open at once when it turns broken; after that, as the organiser left it.
        details.open = before && before[0] === r.state ? before[1] : r.state === "broken";
        const summary = document.createElement("summary");
        summary.textContent = lines.length === 1 ? "1 line" : `${lines.length} lines`;
        const pre = document.createElement("pre");
        pre.className = "output";
        pre.textContent = lines.join("\n");
        details.append(summary, pre);
        out.append(details);
      } else {
        out.textContent = "–";
      }
      tr.append(name, health, when, host, out);
      return tr;
    }));
  }

  // The audit trail (SPEC §13): the newest events; a shared flag's row names its owner.
  const KIND_TEXT = {
    start: "Start", stop: "Stop", extend: "Extend", restart: "Restart", expire: "Expired",
    flag: "Flag check", flag_shared: "Shared flag", admin: "Organiser action",
  };

  function renderAudit(events) {
    const rows = events.map((e) => {
      const tr = document.createElement("tr");
      tr.dataset.kind = e.kind;
      const detail = e.kind === "flag_shared" ? `flag of team ${e.owner}`
        : [e.action, e.name].filter(Boolean).join(" · ");
      const cells = [String(e.time || "").replace("T", " ").replace(/\.\d+Z$/, ""),
        KIND_TEXT[e.kind] || e.kind, e.team_id || "–", e.challenge || "–",
        e.actor === "admin" ? "organiser" : String(e.actor || "").replace(/^team:/, "team "),
        e.outcome, detail];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 5) td.dataset.outcome = ["ok", "correct"].includes(e.outcome) ? "ok"
          : e.outcome === "wrong" ? "wrong" : "error";
        tr.append(td);
      });
      return tr;
    });
    $("#audit tbody").replaceChildren(...rows);
    $("#no-events").hidden = rows.length > 0;
    $("#audit-count").textContent = rows.length ? `(newest ${rows.length})` : "";
  }

  function renderHealth(h) {
    const set = (key, ok, text) => {
      const li = $(`[data-health="${key}"]`);
      li.dataset.ok = ok === null ? "unknown" : String(ok);
      $(".value", li).textContent = text;
    };
    if (!h) {
      ["redis", "docker", "workers"].forEach((k) => set(k, null, "unknown"));
      return;
    }
    set("redis", h.redis === true, h.redis === true ? "OK" : "down");
    if (h.docker === "n/a") set("docker", null, "not on this host");
    else set("docker", h.docker === true, h.docker === true ? "OK" : "down");
    const n = Number(h.workers) || 0;
    set("workers", n > 0, n === 1 ? "1 worker" : `${n} workers`);
  }

  function filtered() {
    const team = $("#f-team").value.trim().toLowerCase();
    const ch = $("#f-challenge").value;
    const st = $("#f-status").value;
    return state.all.filter((i) => (!team || i.team_id.toLowerCase().includes(team))
      && (!ch || i.challenge === ch) && (!st || i.status === st));
  }

  function keyOf(i) {
    return `${i.team_id}/${i.challenge}`;
  }

  function renderRows() {
    const tbody = $("#instances tbody");
    const shown = filtered().sort((a, b) => keyOf(a).localeCompare(keyOf(b)));
    const existing = new Map($$("tr", tbody).map((tr) => [tr.dataset.key, tr]));
    const tpl = $("#row-template");
    const rows = shown.map((inst) => {
      const key = keyOf(inst);
      let tr = existing.get(key);
      if (!tr) {
        tr = tpl.content.firstElementChild.cloneNode(true);
        tr.dataset.key = key;
        tr.dataset.team = inst.team_id;
        tr.dataset.challenge = inst.challenge;
        const label = `${inst.challenge} of team ${inst.team_id}`;
        $$("button", tr).forEach((b) => b.setAttribute("aria-label", `${b.textContent} ${label}`));
      }
      fillRow(tr, inst);
      return tr;
    });
    // Rows are reused, and focus put back, so keyboard users keep their place on refresh.
    const focused = tbody.contains(document.activeElement) ? document.activeElement : null;
    tbody.replaceChildren(...rows);
    if (focused && focused.isConnected && !focused.disabled) focused.focus();
    $("#no-instances").hidden = rows.length > 0;
    $("#inst-count").textContent = rows.length === state.all.length
      ? `(${rows.length})` : `(${rows.length} of ${state.all.length})`;
  }

  function fillRow(tr, inst) {
    const busy = state.rowBusy.get(keyOf(inst));
    const status = busy ? "stopping" : inst.status;
    $(".c-team", tr).textContent = inst.team_id;
    $(".c-challenge", tr).textContent = inst.challenge;
    const badge = $(".badge", tr);
    badge.dataset.status = status;
    badge.textContent = busy || STATUS_TEXT[status] || status;
    $(".c-host", tr).textContent = inst.host || "";
    const cell = $(".c-url", tr);
    const href = safeUrl(inst.url);
    const eps = endpointsOf(inst);
    if (eps) {
      let list = $("ul.endpoints", cell);
      if (!list) {
        list = document.createElement("ul");
        list.className = "endpoints";
        cell.replaceChildren(list);
      }
      fillEndpoints(list, eps, true);
    } else if (href) {
      let a = $(":scope > a", cell);
      if (!a) {
        a = document.createElement("a");
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        cell.replaceChildren(a);
      }
      a.href = openUrl(inst);
      a.textContent = href.replace(/^https?:\/\//, "").replace(/\/$/, "");
    } else if (tcpAddress(inst.url)) {
      cell.textContent = inst.url.startsWith("tls:") ? tcpAddress(inst.url)
        : `${tcpAddress(inst.url)} (tcp)`;
    } else {
      cell.textContent = inst.error ? inst.error : "—";
    }
    setCountdown($("time.countdown", tr), inst.status === "running" || inst.status === "starting"
      ? inst.expires_at : null);
    $('button[data-action="stop"]', tr).disabled = !!busy || inst.status === "stopping";
    $('button[data-action="extend"]', tr).disabled = !!busy || inst.status !== "running";
  }

  async function adminOp(tr, op) {
    const team = tr.dataset.team;
    const id = tr.dataset.challenge;
    const key = tr.dataset.key;
    const path = `/api/v1/teams/${encodeURIComponent(team)}/instances/${encodeURIComponent(id)}`;
    const label = `${id} of team ${team}`;
    // Stopping someone else's instance throws away their work: ask first.
    if (op === "stop" && !window.confirm(`Stop ${label}? The team loses this instance.`)) {
      return;
    }
    state.rowBusy.set(key, op === "stop" ? "Stopping…" : "Extending…");
    renderRows();
    try {
      if (op === "stop") {
        const { body } = await api("DELETE", path);
        await followTask(body.task_id);
        state.all = state.all.filter((i) => keyOf(i) !== key);
        announce(`Stopped ${label}.`);
      } else {
        const { status, body } = await api("POST", `${path}/extend`);
        const inst = status === 202 ? await followTask(body.task_id) : body;
        state.all = state.all.map((i) => (keyOf(i) === key ? inst : i));
        announce(`Extended ${label}: expires in ${clock(remaining(inst.expires_at))}.`);
      }
      showError($("#admin-error"), "");
    } catch (err) {
      showError($("#admin-error"), `${op === "stop" ? "Stopping" : "Extending"} ${label}: ${err.message}`);
    } finally {
      state.rowBusy.delete(key);
      renderRows();
      refreshAdmin();
    }
  }

  async function issueToken(event) {
    event.preventDefault();
    const input = $("#issue-team");
    const team = input.value.trim();
    const error = $("#issue-error");
    if (!input.checkValidity() || !team) {
      input.setAttribute("aria-invalid", "true");
      showError(error, "A team id is 1 to 63 letters, digits, '_' or '-', starting with a letter or digit.");
      input.focus();
      return;
    }
    input.setAttribute("aria-invalid", "false");
    try {
      const { body } = await api("GET", `/api/v1/teams/${encodeURIComponent(team)}/token`);
      showError(error, "");
      $("#issued-token").value = body.token;
      $("#issued-link").value = `${window.location.origin}${window.location.pathname}#token=${encodeURIComponent(body.token)}`;
      $("#issued").hidden = false;
      announce(`Token issued for team ${body.team_id}.`);
    } catch (err) {
      showError(error, err.message);
    }
  }

  async function copy(inputSel, what) {
    const input = $(inputSel);
    try {
      await navigator.clipboard.writeText(input.value);
    } catch (_e) {
      input.select();
      document.execCommand("copy");
    }
    announce(`${what} copied to the clipboard.`);
  }

  // -- wiring -----------------------------------------------------------------------------

  function wire() {
    $("#login-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const token = $("#token-input").value.trim();
      if (!token) {
        showError($("#login-error"), "Enter your access token.");
        return;
      }
      signIn(token, { fromForm: true });
    });
    $("#logout").addEventListener("click", signOut);
    $("#cards").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-action]");
      if (!button || button.disabled) return;
      const id = button.closest("article").dataset.challenge;
      ({ start, stop, restart, extend })[button.dataset.action](id);
    });
    $("#instances").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-action]");
      if (!button || button.disabled) return;
      adminOp(button.closest("tr"), button.dataset.action);
    });
    ["#f-team", "#f-challenge", "#f-status"].forEach((sel) => {
      $(sel).addEventListener("input", renderRows);
    });
    $("#filters").addEventListener("submit", (e) => e.preventDefault());
    $("#token-form").addEventListener("submit", issueToken);
    $("#copy-link").addEventListener("click", () => copy("#issued-link", "Dashboard link"));
    $("#copy-token").addEventListener("click", () => copy("#issued-token", "Token"));
    window.addEventListener("hashchange", () => {
      const token = tokenFromFragment();
      if (token) signIn(token);
    });
  }

  function boot() {
    wire();
    const token = tokenFromFragment() || sessionStorage.getItem(TOKEN_KEY);
    if (token) signIn(token);
    else showLogin("");
  }

  boot();
})();
