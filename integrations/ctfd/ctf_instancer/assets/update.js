(function () {
  const root = (window.init && window.init.urlRoot) || "";
  const select = document.querySelector("#ctfi-catalog");
  if (!select) return;
  const run = () => window.ctfiFillCatalog(select, select.dataset.current);
  if (window.ctfiFillCatalog) return run();
  const s = document.createElement("script");
  s.src = root + "/plugins/ctf_instancer/assets/catalog.js";
  s.onload = run;
  document.body.appendChild(s);
})();
