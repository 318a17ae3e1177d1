// trellis console: the only script. Pages work without it; it reloads the live parts of a
// page (elements with data-poll="URL" data-interval="MS") while the tab is visible, and sends
// the browser to the login page when the session has ended. Served from /admin/assets under a
// Content-Security-Policy that allows no inline script.
"use strict";

(function () {
  const LOGIN = "/admin/login";

  function poll(element) {
    const url = element.getAttribute("data-poll");
    const interval = Math.max(1000, Number(element.getAttribute("data-interval")) || 3000);
    let busy = false;

    async function refresh() {
      if (busy || document.hidden) {
        return;
      }
      busy = true;
      element.setAttribute("aria-busy", "true");
      try {
        const response = await fetch(url, {
          credentials: "same-origin",
          headers: { "x-console-fragment": "1" },
          cache: "no-store",
        });
        if (response.redirected && new URL(response.url).pathname === LOGIN) {
          window.location.assign(LOGIN);
          return;
        }
        if (response.status === 401 || response.status === 403) {
          window.location.assign(LOGIN);
          return;
        }
        if (response.ok) {
          // Markup the console rendered itself, every value escaped on the server.
          element.innerHTML = await response.text();
          element.setAttribute("data-updated", String(Date.now()));
        }
      } catch (error) {
        // The gateway is restarting or the network dropped: keep the last figures.
      } finally {
        busy = false;
        element.removeAttribute("aria-busy");
      }
    }

    window.setInterval(refresh, interval);
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) {
        refresh();
      }
    });
  }

  document.querySelectorAll("[data-poll]").forEach(poll);
})();
