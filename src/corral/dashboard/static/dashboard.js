// corral dashboard: refresh the open page in place, and ask before destructive actions.
// No framework, no inline script (the Content-Security-Policy forbids it).
(function () {
  "use strict";

  const STORAGE_KEY = "corral-dashboard-refresh";

  function confirmActions(root) {
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      if (form.dataset.confirmBound) return;
      form.dataset.confirmBound = "1";
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  // Someone is typing, choosing or reading an open form: refreshing would lose it.
  function busy(main) {
    const focused = document.activeElement;
    if (focused && main.contains(focused) && focused.matches("input, textarea, select")) return true;
    if (main.querySelector("details.popover[open]")) return true;
    const selection = window.getSelection();
    return selection !== null && selection.toString().length > 0;
  }

  async function refresh() {
    const main = document.getElementById("content");
    if (!main || document.hidden || busy(main)) return;
    let response;
    try {
      response = await fetch(window.location.href, {
        credentials: "same-origin",
        headers: { "X-Requested-With": "corral-refresh" },
      });
    } catch (error) {
      return; // offline for a moment; the next tick tries again
    }
    if (!response.ok || response.redirected) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const fresh = page.getElementById("content");
    if (!fresh || busy(main)) return;
    const open = Array.from(main.querySelectorAll("details[open][id]"), (d) => d.id);
    const closed = Array.from(main.querySelectorAll("details[id]:not([open])"), (d) => d.id);
    fresh.querySelectorAll(".notice").forEach((notice) => notice.remove());
    const kept = main.querySelector(".notice");
    if (kept) fresh.prepend(kept);
    open.forEach((id) => fresh.querySelector("#" + CSS.escape(id))?.setAttribute("open", ""));
    closed.forEach((id) => fresh.querySelector("#" + CSS.escape(id))?.removeAttribute("open"));
    main.replaceWith(fresh);
    confirmActions(fresh);
    document.dispatchEvent(new CustomEvent("corral:refreshed"));
  }

  function start() {
    confirmActions(document);
    const seconds = Number(document.body.dataset.refreshS || 0);
    const toggle = document.getElementById("refresh-toggle");
    if (!seconds || !toggle) return;
    let on = window.localStorage.getItem(STORAGE_KEY) !== "off";
    const show = function () {
      toggle.textContent = on ? "Auto-refresh on" : "Auto-refresh off";
      toggle.setAttribute("aria-pressed", on ? "true" : "false");
    };
    toggle.hidden = false;
    show();
    toggle.addEventListener("click", function () {
      on = !on;
      window.localStorage.setItem(STORAGE_KEY, on ? "on" : "off");
      show();
    });
    window.setInterval(function () {
      if (on) refresh();
    }, seconds * 1000);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
