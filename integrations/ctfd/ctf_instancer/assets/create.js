(function () {
  const root = (window.init && window.init.urlRoot) || "";
  const run = () => window.ctfiFillCatalog(document.querySelector("#ctfi-catalog"), "");
  if (window.ctfiFillCatalog) return run();
  const s = document.createElement("script");
  s.src = root + "/plugins/ctf_instancer/assets/catalog.js";
  s.onload = run;
  document.body.appendChild(s);
})();
