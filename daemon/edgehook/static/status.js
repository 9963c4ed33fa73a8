// edgehook status page: poll the API, update states, run the buttons. No dependencies.
// Rows are built the way status_page.py builds them, so a poll changes values, not layout.
(() => {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const mock = document.body.dataset.mock === "1";
  const ROWS = 5;  // undelivered deliveries listed per status; the counts say how many
  let timer = null;
  let msgTimer = null;
  let eventsById = new Map();

  // The server sends RFC 3339 UTC ("...Z"); people read their own clock.
  const clock = new Intl.DateTimeFormat(undefined,
    { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const dayClock = new Intl.DateTimeFormat(undefined,
    { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const full = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "long" });

  function localize(t) {
    const d = new Date(t.dateTime);
    if (isNaN(d)) return;
    const today = d.toDateString() === new Date().toDateString();
    t.textContent = (today ? clock : dayClock).format(d);
    t.title = full.format(d);
  }

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

  function time(iso) {
    const t = node("time", "", String(iso || ""));
    t.dateTime = String(iso || "");
    localize(t);
    return t;
  }

  // gone, failing, sending, ok or idle: the same words as status_page.target_health
  function health(w) {
    if (w.gone) return ["gone", "bad"];
    const failed = w.last_error && (!w.last_success ||
      (w.last_error_at && new Date(w.last_error_at) > new Date(w.last_success)));
    if (failed) return ["failing", "bad"];
    if (w.pending) return ["sending", "off"];
    if (w.last_success) return ["ok", "on"];
    return ["no deliveries yet", "off"];
  }

  function applyState(s) {
    for (const [name, o] of Object.entries(s.outputs || {})) {
      const row = document.querySelector('[data-output="' + CSS.escape(name) + '"]');
      if (!row) continue;
      pill($("[data-state]", row), o.state);
      const until = $("[data-until]", row);
      if (o.until) until.replaceChildren("until ", time(o.until));
      else until.replaceChildren();
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
    applyTargets(s.webhooks || {});
  }

  function applyTargets(targets) {
    const frag = document.createDocumentFragment();
    for (const [name, entry] of Object.entries(targets)) {
      const w = entry || {};
      const [word, cls] = health(w);
      const li = node("li", "card");
      li.dataset.target = name;
      const what = node("div", "what");
      what.append(node("span", "name", name));
      const state = node("span", "pill " + cls, word);
      state.dataset.health = "";
      const act = node("div", "do");
      act.append(state);
      li.append(what, act);
      const line = node("div", "detail");
      if (w.last_success) line.append("last success ", time(w.last_success));
      if ("pending" in w) {
        if (line.childNodes.length) line.append(" · ");
        line.append((w.pending || 0) + " pending");
      }
      if (line.childNodes.length) li.append(line);
      if (w.last_error) {
        const err = node("div", "detail error", "last error");
        if (w.last_error_at) err.append(" ", time(w.last_error_at));
        err.append(": " + w.last_error);
        li.append(err);
      }
      frag.append(li);
    }
    $("#targets").replaceChildren(frag);
  }

  function applyEvents(items) {
    eventsById = new Map(items.map((ev) => [ev.id, ev]));
    const list = $("#event-list");
    const frag = document.createDocumentFragment();
    for (const ev of items) {
      const errors = ev.errors || [];
      const li = node("li", errors.length ? "failed" : "");
      li.id = "ev-" + ev.id;
      const summary = node("div", "summary");
      const rules = (ev.rules || []).join(", ");
      const skipped = ev.skipped || [];
      if (rules) {
        summary.append(rules + ": ");
        let first = true;
        for (const r of ev.results || []) {
          if (!first) summary.append("; ");
          first = false;
          if ("output" in r) {
            summary.append(r.output + " " + (r.state || "?"));
            if (r.until) summary.append(" until ", time(r.until));
          } else if ("webhook" in r) {
            summary.append("webhook " + r.webhook + " queued");
          } else if ("publish" in r) {
            summary.append("published " + r.publish);
          } else {
            first = true;
          }
        }
        if (first) summary.append("no action");
      } else {
        summary.append(skipped.length ? "no rule fired" : "no rule");
      }
      li.append(time(ev.time), " ", node("span", "type", ev.type), " ",
                node("span", "source", ev.source), summary);
      for (const s of skipped) {
        const [rule, why] = Array.isArray(s) ? s : [s.rule, s.reason];
        li.append(node("div", "skipped", "skipped " + rule + ": " + why));
      }
      for (const e of errors) li.append(node("div", "error", "error: " + e));
      frag.append(li);
    }
    if (!items.length) frag.append(node("li", "empty", "No events yet."));
    list.replaceChildren(frag);
  }

  function applyRows(list, status, items, total) {
    const frag = document.createDocumentFragment();
    for (const d of items.slice(0, ROWS)) {
      const li = node("li", status);
      li.dataset.row = String(d.id);
      const meta = node("span", "meta", status + " · " + d.attempts +
                        (d.attempts === 1 ? " attempt" : " attempts"));
      if (status === "pending" && d.next_attempt_at) meta.append(" · next try ", time(d.next_attempt_at));
      li.append(node("span", "name", "#" + d.id + " " + d.target), " ", meta);
      if (d.event_id) {
        const from = node("span", "meta from", "from ");
        const ev = eventsById.get(d.event_id);
        if (ev) {
          const a = node("a", "", ev.type + " " + ev.source);
          a.href = "#ev-" + d.event_id;
          from.append(a, " at ", time(ev.time));
        } else {
          from.append("event ", node("code", "", d.event_id));
        }
        li.append(" ", from);
      }
      if (d.waiting_behind !== undefined && d.waiting_behind !== null) {
        li.append(" ", node("span", "meta behind", "waiting behind #" + d.waiting_behind));
      }
      if (d.last_error) li.append(" ", node("span", "error", d.last_error));
      if (status === "dead") {
        const b = node("button", "secondary", "Retry");
        b.type = "button";
        b.dataset.retry = String(d.id);
        li.append(" ", b);
      }
      frag.append(li);
    }
    if (total > ROWS) {
      frag.append(node("li", "more", (total - ROWS) + " more " + status +
                       " (edgehook outbox list)"));
    }
    list.replaceChildren(frag);
  }

  const none = { items: [] };

  async function refresh() {
    try {
      const [s, e] = await Promise.all([
        api("GET", "/api/v1/state"),
        api("GET", "/api/v1/events?limit=50"),
      ]);
      const counts = s.outbox || {};
      const [d, p] = await Promise.all([
        counts.dead ? api("GET", "/api/v1/outbox?status=dead") : none,
        counts.pending ? api("GET", "/api/v1/outbox?status=pending") : none,
      ]);
      applyState(s);
      applyEvents(e.items || []);
      applyRows($("#dead"), "dead", d.items || [], counts.dead || 0);
      applyRows($("#pending"), "pending", p.items || [], counts.pending || 0);
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

  for (const t of document.querySelectorAll("time[datetime]")) localize(t);
  // a server that renders no pending rows leaves them to the first poll: do it now
  const pendingCount = document.querySelector('[data-count="pending"]');
  if (pendingCount && pendingCount.textContent !== "0" && !$("#pending").children.length) refresh();

  function schedule() {
    clearInterval(timer);
    timer = document.hidden ? null : setInterval(refresh, 2000);
  }
  document.addEventListener("visibilitychange", () => { schedule(); if (!document.hidden) refresh(); });
  schedule();
})();
