// The dashboard's only script: fetch each panel's HTML again every few seconds, send the admin's
// button presses to the JSON API, and log in and out. No framework, no build step.
"use strict";

function notice(text, bad) {
  const box = document.getElementById("notice");
  if (!box) return;
  box.textContent = text;
  box.className = bad ? "bad" : "ok";
  box.hidden = false;
}

async function refresh(panel) {
  const response = await fetch(panel.dataset.poll, { headers: { Accept: "text/html" } });
  if (response.status === 401) { window.location = "/login?next=" + window.location.pathname; return; }
  if (!response.ok) return;
  const html = await response.text();
  if (panel.dataset.html !== html) {
    panel.dataset.html = html;
    panel.innerHTML = html;
  }
  const preview = document.getElementById("preview");
  const head = panel.querySelector(".job-head");
  if (preview && head && head.dataset.results === "yes" && !document.getElementById("preview-image")) {
    preview.innerHTML = '<img id="preview-image" alt="CT slices with each segment drawn in its colour" src="' + preview.dataset.src + '?t=' + Date.now() + '">';
  }
}

function poll() {
  for (const panel of document.querySelectorAll("[data-poll]")) {
    const every = Number(panel.dataset.every || 2000);
    const tick = () => refresh(panel).catch(() => {}).finally(() => setTimeout(tick, every));
    tick();
  }
}

async function act(button) {
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  let body = null;
  if (button.dataset.bodyFrom) {
    body = JSON.stringify({ [button.dataset.bodyKey]: document.getElementById(button.dataset.bodyFrom).value });
  }
  button.disabled = true;
  try {
    const response = await fetch(button.dataset.action, {
      method: "POST",
      headers: body ? { "Content-Type": "application/json" } : {},
      body,
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      notice(answer.detail ? String(answer.detail) : "The node answered " + response.status, true);
    } else if (answer.answer) {
      notice(answer.answer, !answer.ok);
    } else if (answer.id && button.id === "rerun") {
      window.location = "/jobs/" + answer.id;
      return;
    } else {
      notice("Done.", false);
    }
  } finally {
    button.disabled = false;
  }
  for (const panel of document.querySelectorAll("[data-poll]")) refresh(panel).catch(() => {});
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) act(button);
});

async function login(event) {
  event.preventDefault();
  const error = document.getElementById("login-error");
  const response = await fetch("/api/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      name: document.getElementById("name").value,
      password: document.getElementById("password").value,
      cookie: true,
    }),
  });
  if (response.ok) {
    // Only a page of this node: "next" comes from the address bar, which anyone can write.
    const next = new URL(new URLSearchParams(window.location.search).get("next") || "/", window.location.origin);
    // The whole address: a path alone such as "//elsewhere" would leave the node.
    window.location = next.origin === window.location.origin ? next.href : "/";
    return;
  }
  const answer = await response.json().catch(() => ({}));
  error.textContent = answer.detail || "The node answered " + response.status;
  error.hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("login");
  if (form) form.addEventListener("submit", login);
  const out = document.getElementById("logout");
  if (out) out.addEventListener("click", async () => {
    await fetch("/api/logout", { method: "POST" });
    window.location = "/login";
  });
  poll();
});
