// The "instanced" challenge's modal: the team's own instance, through CTFd's server only.
// No token is ever in this page: every call goes to the plugin's routes on CTFd, which call
// the instancer server-side.
CTFd._internal.challenge.data = undefined;
CTFd._internal.challenge.renderer = null;
CTFd._internal.challenge.preRender = function () {};
CTFd._internal.challenge.render = null;

(function () {
  const PHASES = {
    queued: ["Waiting for a worker…", 5],
    image: ["Checking the image…", 10],
    pulling: ["Downloading the image…", 30],
    creating: ["Creating the container…", 70],
    starting: ["Waiting for it to answer…", 85],
  };
  const LABELS = {
    none: ["Not running", "bg-secondary"],
    starting: ["Starting", "bg-info"],
    running: ["Running", "bg-success"],
    stopping: ["Stopping", "bg-warning"],
    failed: ["Failed", "bg-danger"],
  };

  function root() {
    return (CTFd.config && CTFd.config.urlRoot) || "";
  }

  async function call(challengeId, action, query) {
    const path = `/plugins/ctf_instancer/api/${challengeId}` + (action ? `/${action}` : "");
    const options = action
      ? { method: "POST", body: "{}", headers: { "Content-Type": "application/json", Accept: "application/json" } }
      : { method: "GET", headers: { Accept: "application/json" } };
    let response;
    try {
      response = await CTFd.fetch(path + (query || ""), options);
    } catch (e) {
      return { success: false, error: { detail: "CTFd cannot be reached; check your connection." } };
    }
    try {
      return await response.json();
    } catch (e) {
      return { success: false, error: { detail: `CTFd answered ${response.status}; reload the page.` } };
    }
  }

  function clock(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(r).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function mount(panel) {
    const id = parseInt(panel.dataset.ctfiChallenge, 10);
    const $ = (sel) => panel.querySelector(sel);
    const state = { view: null, deadline: null, task: null, busy: false, poll: null };

    function showError(detail) {
      const box = $(".ctfi-error");
      box.textContent = detail || "";
      box.hidden = !detail;
    }

    function render(view) {
      state.view = view;
      const status = view.status || "none";
      const [label, cls] = LABELS[status] || [status, "bg-secondary"];
      const badge = $(".ctfi-status");
      badge.textContent = label;
      badge.className = `badge ctfi-status ${cls}`;

      const progress = $(".ctfi-progress");
      progress.hidden = status !== "starting";
      if (status === "starting") {
        const p = view.progress || {};
        let [text, pct] = PHASES[p.phase] || PHASES.queued;
        if (p.phase === "pulling" && p.bytes_total) {
          pct = 10 + Math.round(60 * (p.bytes_done || 0) / p.bytes_total);
          text = `Downloading the image (${p.layers_done || 0}/${p.layers_total || "?"} layers)…`;
        }
        $(".ctfi-phase").textContent = text;
        $(".progress-bar").style.width = `${pct}%`;
      }

      // A Compose instance (SPEC §12): every endpoint on its own line, each with its link
      // (through CTFd's open route, which fetches a fresh access link) or its address to copy.
      const endpoints = Array.isArray(view.endpoints) && status !== "none" ? view.endpoints : [];
      $(".ctfi-endpoints").hidden = endpoints.length === 0;
      $(".ctfi-endpoint-list").replaceChildren(...endpoints.map((ep) => {
        const li = document.createElement("li");
        li.className = "ctfi-endpoint";
        li.dataset.service = ep.service;
        const name = document.createElement("span");
        name.className = "text-muted me-1";
        name.textContent = `${ep.service}:${ep.port}`;
        let value;
        if (ep.web && ep.open_url) {
          value = document.createElement("a");
          value.className = "ctfi-endpoint-link";
          value.target = "_blank";
          value.rel = "noopener noreferrer";
          value.href = root() + ep.open_url;
        } else {
          value = document.createElement("code");
          value.className = "ctfi-endpoint-plain user-select-all";
        }
        value.textContent = ep.address || "";
        li.append(name, value);
        return li;
      }));

      const address = $(".ctfi-address");
      address.hidden = !view.address || status === "none" || endpoints.length > 0;
      if (view.address) {
        const link = $(".ctfi-link"), plain = $(".ctfi-plain");
        link.hidden = !view.web;
        plain.hidden = !!view.web;
        if (view.web) {
          link.href = root() + view.open_url;
          link.textContent = view.address;
        } else {
          plain.textContent = view.address;
        }
      }

      // A TCP instance: each command a player may paste (nc, ncat --ssl, openssl, pwntools),
      // with a Copy button; for a Compose instance, those of each TCP endpoint.
      const lines = status === "none" ? [] : endpoints.length
        ? endpoints.flatMap((ep) => (ep.connect || []).map((c) => ({ ...c, service: ep.service })))
        : (view.connect || []);
      $(".ctfi-connect").hidden = lines.length === 0;
      const connectSig = JSON.stringify(lines);
      const connectList = $(".ctfi-connect-list");
      if (connectList.dataset.sig !== connectSig) {
        connectList.dataset.sig = connectSig;
        connectList.replaceChildren(...lines.map((c) => {
          const li = document.createElement("li");
          li.className = "ctfi-connect-line d-flex align-items-center gap-2";
          li.dataset.tool = c.tool;
          const code = document.createElement("code");
          code.className = "user-select-all";
          code.textContent = c.line;
          const copy = document.createElement("button");
          copy.type = "button";
          copy.className = "btn btn-link btn-sm p-0 ctfi-copy";
          copy.textContent = "Copy";
          copy.setAttribute("aria-label", `Copy the ${c.tool} line${c.service ? ` of ${c.service}` : ""}`);
          copy.addEventListener("click", async () => {
            try {
              await navigator.clipboard.writeText(c.line);
              copy.textContent = "Copied";
            } catch (e) {
              getSelection().selectAllChildren(code);
              copy.textContent = "Press Ctrl+C";
            }
            setTimeout(() => { copy.textContent = "Copy"; }, 2000);
          });
          li.append(code, copy);
          return li;
        }));
      }

      state.deadline = typeof view.expires_in === "number" ? Date.now() + view.expires_in * 1000 : null;
      $(".ctfi-expiry").hidden = state.deadline === null || status === "none";
      tick();

      const note = $(".ctfi-note");
      const reason = status === "failed" && view.reason ? `It failed: ${view.reason}` : "";
      note.textContent = view.status_note || reason;
      note.hidden = !note.textContent;

      const running = status === "running" || status === "starting";
      $(".ctfi-start").disabled = state.busy || running || status === "stopping";
      $(".ctfi-start").textContent = status === "failed" ? "Restart" : "Start";
      $(".ctfi-extend").disabled = state.busy || status !== "running";
      $(".ctfi-restart").disabled = state.busy || status !== "running";
      $(".ctfi-stop").disabled = state.busy || status === "none" || status === "stopping";
      if (view.error) showError(view.error);
    }

    function tick() {
      if (state.deadline === null) return;
      const left = (state.deadline - Date.now()) / 1000;
      $(".ctfi-countdown").textContent = clock(left);
      $(".ctfi-countdown").setAttribute("datetime", (state.view && state.view.expires_at) || "");
    }

    async function refresh() {
      const query = state.task ? `?task=${encodeURIComponent(state.task)}` : "";
      const body = await call(id, null, query);
      if (!panel.isConnected) return;
      if (body.success) {
        // A start's or restart's task still running: the instance is on its way (a restart's
        // old instance may still be listed as running until the task replaces it).
        const pending = state.task && body.data.state && !["SUCCESS", "FAILURE", "REVOKED"].includes(body.data.state);
        if (pending && body.data.status === "running") body.data.status = "starting";
        if (body.data.status !== "starting" && !pending) state.task = null;
        render(body.data);
      } else {
        showError(body.error && body.error.detail);
      }
      schedule();
    }

    function schedule() {
      clearTimeout(state.poll);
      const status = state.view && state.view.status;
      // Fast while something is changing; slowly otherwise, to notice expiry and the janitor.
      const wait = state.task || status === "starting" || status === "stopping" ? 1000 : 15000;
      state.poll = setTimeout(() => panel.isConnected && refresh(), wait);
    }

    async function act(action) {
      // A restart throws away what the team changed in its instance: ask first.
      if (action === "restart" && !window.confirm("Restart this instance? You get a fresh one with the same flag: everything changed in it is lost.")) {
        return;
      }
      const starts = action === "start" || action === "restart";
      state.busy = true;
      showError("");
      if (state.view) render(state.view);
      if (starts) render({ ...(state.view || {}), status: "starting", progress: {} });
      const body = await call(id, action);
      state.busy = false;
      if (!panel.isConnected) return;
      if (body.success) {
        if (starts) state.task = body.data.task_id || null;
        // Until its task runs, a restarted instance still shows the old one as running.
        if (action === "restart" && body.data.status === "running") body.data.status = "starting";
        render(body.data);
      } else {
        showError(body.error && body.error.detail);
        await refresh();
        return;
      }
      schedule();
    }

    $(".ctfi-start").addEventListener("click", () => act("start"));
    $(".ctfi-stop").addEventListener("click", () => act("stop"));
    $(".ctfi-extend").addEventListener("click", () => act("extend"));
    $(".ctfi-restart").addEventListener("click", () => act("restart"));
    const ticker = setInterval(() => {
      if (!panel.isConnected) {
        clearInterval(ticker);
        clearTimeout(state.poll);
        return;
      }
      tick();
    }, 1000);
    refresh();
  }

  // The modal's HTML is put in place by the theme after this script runs: wait for it.
  CTFd._internal.challenge.postRender = function () {
    const started = Date.now();
    (function look() {
      document.querySelectorAll(".ctfi-panel[data-ctfi-challenge]").forEach((panel) => {
        if (!panel.dataset.ctfiMounted) {
          panel.dataset.ctfiMounted = "1";
          mount(panel);
        }
      });
      if (!document.querySelector(".ctfi-panel[data-ctfi-mounted]") && Date.now() - started < 10000) {
        setTimeout(look, 50);
      }
    })();
  };
})();

CTFd._internal.challenge.submit = function (preview) {
  const challenge_id = parseInt(CTFd.lib.$("#challenge-id").val());
  const submission = CTFd.lib.$("#challenge-input").val();
  const params = {};
  if (preview) params["preview"] = true;
  return CTFd.api.post_challenge_attempt(params, { challenge_id, submission }).then((r) => r);
};
