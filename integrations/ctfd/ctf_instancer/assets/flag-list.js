// Admin > Challenges > a challenge > Flags: CTFd's flag list (its FlagList.vue) shows each
// flag's content verbatim, and offers flag types no hook for that column. An `instancer` flag's
// content is empty (the flag is each team's own, held by the instancer) or names an in-app
// challenge, so its Flag cell would read blank: this says what the flag is, in a note of its own
// beside CTFd's <pre>, never touching the nodes CTFd's Vue renders.
(function () {
  "use strict";
  if (!/\/admin\/challenges\/\d+\/?$/.test(window.location.pathname)) return;

  const TEAM_FLAG = "each team's own flag";
  const IN_APP = "each team's own in-app flag, for the challenge named above";

  // The note a row should carry, or null for a flag of another type.
  function wanted(row) {
    const typed = row.querySelector("[flag-type]");
    const content = row.querySelector("pre.flag-content");
    if (!typed || !content || typed.getAttribute("flag-type") !== "instancer") return null;
    return content.textContent.trim() ? IN_APP : TEAM_FLAG;
  }

  function label(board) {
    board.querySelectorAll("tbody tr").forEach((row) => {
      const content = row.querySelector("pre.flag-content");
      if (!content) return;
      const cell = content.parentNode;
      let note = cell.querySelector(".ctfi-flag-note");
      const text = wanted(row);
      if (text === null) {
        if (note) note.remove();
        return;
      }
      if (!note) {
        note = document.createElement("span");
        note.className = "ctfi-flag-note text-muted font-italic";
        cell.appendChild(note);
      }
      // Written only when it differs, so our own change does not wake the observer forever.
      if (note.textContent !== text) note.textContent = text;
    });
  }

  // The list is mounted and filled after load (an API call), and refilled after every
  // create, edit or delete: follow it.
  function watch() {
    const root = document.getElementById("challenge-flags");
    if (!root) return;
    const observer = new MutationObserver(() => {
      const board = root.querySelector("#flagsboard");
      if (board) label(board);
    });
    observer.observe(root, { childList: true, subtree: true, characterData: true,
                             attributes: true, attributeFilter: ["flag-type"] });
    const board = root.querySelector("#flagsboard");
    if (board) label(board);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", watch);
  } else {
    watch();
  }
})();
