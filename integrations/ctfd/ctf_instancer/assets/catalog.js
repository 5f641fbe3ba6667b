// Fills the "Instancer challenge" select from the instancer's catalog (through CTFd, admin only).
window.ctfiFillCatalog = function (select, current) {
  const root = (window.init && window.init.urlRoot) || "";
  const error = select.parentElement.querySelector(".ctfi-catalog-error");
  // A request cut off while the page is still settling is tried again (three times).
  const get = (tries) => fetch(root + "/admin/ctf_instancer/api/catalog", { credentials: "same-origin", headers: { Accept: "application/json" } })
    .catch((e) => (tries > 1 ? new Promise((ok) => setTimeout(ok, 1000)).then(() => get(tries - 1)) : Promise.reject(e)));
  get(3)
    .then((r) => r.json())
    .then((body) => {
      if (!body.success) throw new Error(body.error && body.error.detail);
      select.innerHTML = "";
      const none = document.createElement("option");
      none.value = "";
      none.disabled = true;
      none.textContent = "Pick one…";
      select.appendChild(none);
      body.data.forEach((ch) => {
        const option = document.createElement("option");
        option.value = ch.id;
        const ttl = ch.ttl ? `, lives ${Math.round(ch.ttl / 60)} min` : "";
        const flagless = ch.flag === false ? ", no per-team flag" : "";
        option.textContent = `${ch.name} (${ch.id}, ${ch.protocol}${ttl}${flagless})`;
        option.dataset.flag = ch.flag === false ? "no" : "yes";
        select.appendChild(option);
      });
      select.value = current || "";
      if (!select.value) none.selected = true;
      window.ctfiFlagWarning(select);
    })
    .catch((e) => {
      error.textContent = `Cannot read the instancer's catalog: ${e.message || e}. ` +
        "Check Admin > Instancer > Settings.";
      error.hidden = false;
      if (current) {
        select.innerHTML = "";
        const option = document.createElement("option");
        option.value = current;
        option.textContent = current;
        select.appendChild(option);
      }
    });
};

// Warns, beside the select, when the per-team flag box is ticked for a catalog challenge whose
// containers hold no flag (the catalog says flag: false): no team could ever solve it.
window.ctfiFlagWarning = function (select) {
  const form = select.closest("form") || document;
  const box = form.querySelector("#ctfi-flag");
  const warning = select.parentElement.querySelector(".ctfi-flag-warning");
  if (!warning) return;
  const option = select.options[select.selectedIndex];
  const flagless = option && option.dataset.flag === "no";
  warning.hidden = !(flagless && (!box || box.checked));
};
