// edgehook status page: poll the API, update states, run the buttons. No dependencies.
(() => {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const mock = document.body.dataset.mock === "1";
  let timer = null;
  let msgTimer = null;

  function say(text) {
    const m = $("#msg");
    m.textContent = text;
    m.hidden = false;
    clearTimeout(msgTimer);
    msgTimer = setTimeout(() => { m.hidden = true; }, 4000);
  }

  async function api(method, path, data) {
    const opts = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (data !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(data);
    }
    const r = await fetch(path, opts);
    if (r.status === 401) { location.reload(); throw new Error("signed out"); }
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.detail) || ("HTTP " + r.status));
    return body;
  }

  function pill(el, state) {
    if (!el) return;
    el.textContent = state;
    el.classList.toggle("on", state === "on");
  }

  function node(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function applyState(s) {
    for (const [name, o] of Object.entries(s.outputs || {})) {
      const row = document.querySelector('[data-output="' + CSS.escape(name) + '"]');
      if (!row) continue;
      pill($("[data-state]", row), o.state);
      $("[data-until]", row).textContent = o.until ? "until " + o.until.slice(11, 19) + "Z" : "";
    }
    for (const [name, i] of Object.entries(s.inputs || {})) {
      const row = document.querySelector('[data-input-row="' + CSS.escape(name) + '"]');
      if (row) pill($("[data-state]", row), i.state);
    }
    const mq = $("#mqtt");
    if (s.mqtt && mq) {
      mq.textContent = "MQTT " + (s.mqtt.connected ? "connected" : "disconnected");
      mq.className = "pill " + (s.mqtt.connected ? "on" : "bad");
    }
    for (const key of ["pending", "dead", "delivered"]) {
      const el = document.querySelector('[data-count="' + key + '"]');
      if (el) el.textContent = String((s.outbox || {})[key] || 0);
    }
  }

  function applyEvents(items) {
    const list = $("#event-list");
    const frag = document.createDocumentFragment();
    for (const ev of items) {
      const li = node("li", ev.errors && ev.errors.length ? "failed" : "");
      const t = node("time", "", String(ev.time || "").slice(11, 19));
      t.dateTime = ev.time || "";
      li.append(t, " ", node("span", "type", ev.type), " ", node("span", "source", ev.source),
                node("div", "summary", ev.summary || ""));
      frag.append(li);
    }
    if (!items.length) frag.append(node("li", "empty", "No events yet."));
    list.replaceChildren(frag);
  }

  function applyDead(items) {
    const list = $("#dead");
    const frag = document.createDocumentFragment();
    for (const d of items.slice(0, 5)) {
      const li = node("li");
      const b = node("button", "secondary", "Retry");
      b.type = "button";
      b.dataset.retry = String(d.id);
      li.append(node("span", "name", "#" + d.id + " " + d.target), " ",
                node("span", "meta", d.attempts + (d.attempts === 1 ? " attempt" : " attempts")), " ",
                node("span", "error", d.last_error || ""), " ", b);
      frag.append(li);
    }
    list.replaceChildren(frag);
  }

  async function refresh() {
    try {
      const [s, e, d] = await Promise.all([
        api("GET", "/api/v1/state"),
        api("GET", "/api/v1/events?limit=50"),
        api("GET", "/api/v1/outbox?status=dead"),
      ]);
      applyState(s);
      applyEvents(e.items || []);
      applyDead(d.items || []);
      $("#stale").hidden = true;
    } catch (err) {
      $("#stale").hidden = false;
    }
  }

  async function act(button) {
    button.disabled = true;
    try {
      if (button.dataset.toggle) {
        const r = await api("PUT", "/api/v1/outputs/" + encodeURIComponent(button.dataset.toggle),
                            { state: "toggle" });
        const row = button.closest("[data-output]");
        if (row) pill($("[data-state]", row), r.state);
      } else if (button.dataset.sim && mock) {
        await api("POST", "/api/v1/inputs/" + encodeURIComponent(button.dataset.input) +
                  "/simulate", { action: button.dataset.sim });
      } else if (button.dataset.retry) {
        await api("POST", "/api/v1/outbox/" + encodeURIComponent(button.dataset.retry) + "/retry");
        say("delivery #" + button.dataset.retry + " queued again");
      }
      setTimeout(refresh, 300);
    } catch (err) {
      say(err.message);
    } finally {
      button.disabled = false;
    }
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-toggle], button[data-sim], button[data-retry]");
    if (b) act(b);
  });

  function schedule() {
    clearInterval(timer);
    timer = document.hidden ? null : setInterval(refresh, 2000);
  }
  document.addEventListener("visibilitychange", () => { schedule(); if (!document.hidden) refresh(); });
  schedule();
})();
