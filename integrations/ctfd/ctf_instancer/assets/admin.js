// Admin > Instancer > Instances: every instance, with Stop and Extend (calls go to CTFd, never to the instancer).
(function () {
  const page = document.querySelector("#ctfi-admin");
  const root = (window.init && window.init.urlRoot) || "";
  const nonce = (window.init && window.init.csrfNonce) || "";
  const $ = (sel) => page.querySelector(sel);
  let rows = [];
  let loadedAt = Date.now();

  function clock(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}` : `${m}:${String(r).padStart(2, "0")}`;
  }

  function say(box, text) {
    $(box).textContent = text || "";
    $(box).hidden = !text;
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (text !== undefined && text !== null) td.textContent = text;
    return td;
  }

  function render() {
    const filter = $(".ctfi-filter").value.trim().toLowerCase();
    const body = $(".ctfi-rows");
    body.innerHTML = "";
    const shown = rows.filter((r) => !filter ||
      [r.team_id, r.account, r.challenge, r.challenge_name].some((v) => (v || "").toLowerCase().includes(filter)));
    $(".ctfi-count").textContent = `${rows.length} instance${rows.length === 1 ? "" : "s"}` +
      (shown.length !== rows.length ? `, ${shown.length} shown` : "");
    if (!shown.length) {
      const tr = document.createElement("tr");
      tr.appendChild(cell(rows.length ? "No instance matches." : "No instance is running.", "text-center text-muted"));
      tr.firstChild.colSpan = 6;
      body.appendChild(tr);
    }
    shown.forEach((r) => {
      const tr = document.createElement("tr");
      tr.dataset.team = r.team_id;
      tr.dataset.challenge = r.challenge;
      const team = cell();
      if (r.account_url) {
        const a = document.createElement("a");
        a.href = r.account_url;
        a.textContent = r.account;
        team.appendChild(a);
      } else {
        team.textContent = r.account || "";
      }
      const small = document.createElement("small");
      small.className = "d-block text-muted";
      small.textContent = r.team_id;
      team.appendChild(small);
      tr.appendChild(team);
      tr.appendChild(cell(r.challenge_name ? `${r.challenge_name} (${r.challenge})` : r.challenge));
      tr.appendChild(cell(r.status, "ctfi-row-status"));
      const address = cell();
      if (r.url) {
        const code = document.createElement("code");
        code.textContent = r.url;
        address.appendChild(code);
      }
      tr.appendChild(address);
      const left = cell("", "ctfi-left");
      left.dataset.expiresIn = r.expires_in === null || r.expires_in === undefined ? "" : r.expires_in;
      tr.appendChild(left);
      const actions = cell("", "text-right text-nowrap");
      [["Extend", "extend", "btn-outline-secondary"], ["Stop", "stop", "btn-outline-danger"]].forEach(([label, action, cls]) => {
        const b = document.createElement("button");
        b.type = "button";
        b.className = `btn btn-sm ${cls} ml-1`;
        b.textContent = label;
        b.addEventListener("click", () => act(r, action, b));
        actions.appendChild(b);
      });
      tr.appendChild(actions);
      body.appendChild(tr);
    });
    tick();
  }

  function tick() {
    const gone = (Date.now() - loadedAt) / 1000;
    page.querySelectorAll(".ctfi-left").forEach((td) => {
      const v = td.dataset.expiresIn;
      td.textContent = v === "" ? "" : clock(Number(v) - gone);
    });
  }

  async function load() {
    try {
      const r = await fetch(root + "/admin/ctf_instancer/api/instances", { credentials: "same-origin", headers: { Accept: "application/json" } });
      const body = await r.json();
      if (!body.success) throw new Error(body.error && body.error.detail);
      rows = body.data;
      loadedAt = Date.now();
      say(".ctfi-error", "");
      render();
    } catch (e) {
      say(".ctfi-error", `Cannot list the instances: ${e.message || e}`);
    }
  }

  async function act(r, action, button) {
    if (action === "stop" && !confirm(`Stop ${r.challenge} of ${r.account || r.team_id}? Its container is removed.`)) return;
    button.disabled = true;
    say(".ctfi-done", "");
    try {
      const url = `${root}/admin/ctf_instancer/api/instances/${encodeURIComponent(r.team_id)}/${encodeURIComponent(r.challenge)}/${action}`;
      const resp = await fetch(url, {
        method: "POST", credentials: "same-origin", body: "{}",
        headers: { "Content-Type": "application/json", Accept: "application/json", "CSRF-Token": nonce },
      });
      const body = await resp.json();
      if (!body.success) throw new Error(body.error && body.error.detail);
      say(".ctfi-error", "");
      say(".ctfi-done", action === "stop" ? `Stopped ${r.challenge} of ${r.account || r.team_id}.` : `Extended ${r.challenge} of ${r.account || r.team_id}.`);
    } catch (e) {
      say(".ctfi-error", `${action === "stop" ? "Stop" : "Extend"} failed: ${e.message || e}`);
    }
    button.disabled = false;
    await load();
  }

  function account(name, url, teamId) {
    const td = cell();
    if (url) {
      const a = document.createElement("a");
      a.href = url;
      a.textContent = name;
      td.appendChild(a);
    } else {
      td.textContent = name || "";
    }
    const small = document.createElement("small");
    small.className = "d-block text-muted";
    small.textContent = teamId;
    td.appendChild(small);
    return td;
  }

  // Flags one team submitted that were another's (the instancer's GET /api/v1/flags/shared).
  async function loadShared() {
    const body = $(".ctfi-shared-rows");
    try {
      const r = await fetch(root + "/admin/ctf_instancer/api/shared_flags", { credentials: "same-origin", headers: { Accept: "application/json" } });
      const answer = await r.json();
      if (!answer.success) throw new Error(answer.error && answer.error.detail);
      say(".ctfi-shared-error", "");
      body.innerHTML = "";
      if (!answer.data.length) {
        const tr = document.createElement("tr");
        tr.appendChild(cell("No team has submitted another team's flag.", "text-center text-muted"));
        tr.firstChild.colSpan = 4;
        body.appendChild(tr);
      }
      answer.data.forEach((e) => {
        const tr = document.createElement("tr");
        tr.className = "ctfi-shared-row";
        tr.dataset.team = e.team_id;
        tr.dataset.owner = e.owner;
        tr.appendChild(cell(e.time ? new Date(e.time).toLocaleString() : ""));
        tr.appendChild(account(e.account, e.account_url, e.team_id));
        tr.appendChild(account(e.owner_account, e.owner_url, e.owner));
        tr.appendChild(cell(e.challenge_name ? `${e.challenge_name} (${e.challenge})` : e.challenge));
        body.appendChild(tr);
      });
    } catch (e) {
      say(".ctfi-shared-error", `Cannot list the shared flags: ${e.message || e}`);
    }
  }

  // Instanced challenges scored by a per-team flag that none of their containers holds.
  async function loadWarnings() {
    const box = $(".ctfi-flag-warning");
    try {
      const r = await fetch(root + "/admin/ctf_instancer/api/warnings", { credentials: "same-origin", headers: { Accept: "application/json" } });
      const answer = await r.json();
      if (!answer.success || !answer.data.length) { box.hidden = true; return; }
      box.textContent = "No team can ever solve these: they are scored with each team's own flag, " +
        "but their catalog challenge puts no flag in its containers (no flag_env, no ${CTF_FLAG}): ";
      answer.data.forEach((w, i) => {
        const a = document.createElement("a");
        a.href = w.url;
        a.textContent = `${w.name} (${w.instancer_challenge})`;
        if (i) box.appendChild(document.createTextNode(", "));
        box.appendChild(a);
      });
      box.hidden = false;
    } catch (e) {
      box.hidden = true;
    }
  }

  $(".ctfi-reload").addEventListener("click", () => { load(); loadShared(); });
  $(".ctfi-filter").addEventListener("input", render);
  setInterval(tick, 1000);
  setInterval(load, 10000);
  setInterval(loadShared, 30000);
  load();
  loadShared();
  loadWarnings();
})();
