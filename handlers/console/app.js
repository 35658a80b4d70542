// The console's entry point: the views, the navigation between them, the admin key prompt.

import { AdminKeyError, forgetAdminKey, rememberAdminKey } from "./admin.js";
import { loadDeployments } from "./deployments.js";
import { setUpPlayground } from "./playground.js";
import { loadUsage } from "./usage.js";

const ADMIN_VIEWS = { deployments: loadDeployments, usage: loadUsage };
const VIEWS = ["playground", ...Object.keys(ADMIN_VIEWS)];

const keyPanel = document.getElementById("admin-key");
const keyForm = document.getElementById("admin-key-form");
const keyError = document.getElementById("admin-key-error");
let current = null;

function askForKey(message) {
  keyError.textContent = message;
  keyPanel.hidden = false;
  keyForm.elements.key.value = "";
  keyForm.elements.key.focus();
}

async function loadAdminView(name) {
  const section = document.getElementById(name);
  const error = section.querySelector(".error");
  error.hidden = true;
  try {
    await ADMIN_VIEWS[name](section);
    keyPanel.hidden = true;
    section.hidden = false;
  } catch (failure) {
    if (failure instanceof AdminKeyError) {
      section.hidden = true;
      if (failure.hadKey) {
        forgetAdminKey();
        askForKey(`The admin key was refused (${failure.status}): ${failure.message}`);
      } else {
        askForKey(`This view needs an admin key: ${failure.message}`);
      }
      return;
    }
    section.hidden = false;
    error.textContent = `Could not load ${name}: ${failure.message}`;
    error.hidden = false;
  }
}

function show(name) {
  current = VIEWS.includes(name) ? name : "playground";
  for (const view of VIEWS) {
    document.getElementById(view).hidden = true;
  }
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  keyPanel.hidden = true;
  if (current in ADMIN_VIEWS) loadAdminView(current);
  else document.getElementById(current).hidden = false;
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = keyForm.elements.key.value.trim();
  if (!key) return;
  rememberAdminKey(key);
  keyError.textContent = "";
  if (current in ADMIN_VIEWS) loadAdminView(current);
});

for (const button of document.querySelectorAll("[data-refresh]")) {
  button.addEventListener("click", () => loadAdminView(button.dataset.refresh));
}

window.addEventListener("hashchange", () => show(location.hash.slice(1)));
setUpPlayground(document.getElementById("playground"));
show(location.hash.slice(1));
