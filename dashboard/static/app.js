// Gremlin dashboard: behaviour shared by every page (no inline scripts: the CSP forbids them).
"use strict";

// A form with data-confirm asks before it submits (restores, model switches).
document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
