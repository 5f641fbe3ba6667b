(function () {
  const root = (window.init && window.init.urlRoot) || "";
  const select = document.querySelector("#ctfi-catalog");
  const box = document.querySelector("#ctfi-flag");
  const warn = () => window.ctfiFlagWarning && window.ctfiFlagWarning(select);
  select.addEventListener("change", warn);
  box.addEventListener("change", warn);
  // CTFd's "Options" step after Create offers a static flag: beside the per-team flag it
  // would be right for every team, so the plugin refuses it; say so there, before it is typed.
  const options = document.querySelector("#challenge-create-options");
  const flagInput = options && options.querySelector("input[name=flag]");
  if (flagInput && window.$) {
    window.$(options).on("show.bs.modal", () => {
      const ours = document.querySelector("#ctfi-flag");
      const perTeam = Boolean(ours && document.body.contains(ours) && ours.checked);
      flagInput.disabled = perTeam;
      flagInput.placeholder = perTeam ? "Scored with each team's own flag: a static flag would be right for every team" : "";
      if (perTeam) flagInput.value = "";
    });
  }
  const run = () => window.ctfiFillCatalog(select, "");
  if (window.ctfiFillCatalog) return run();
  const s = document.createElement("script");
  s.src = root + "/plugins/ctf_instancer/assets/catalog.js";
  s.onload = run;
  document.body.appendChild(s);
})();
