// vitscope explorer: what every page shares. Plain JavaScript, no build step, nothing fetched
// from outside the server.
"use strict";

class ApiError extends Error {
  constructor(body, status) {
    super(body.message || "request failed");
    this.body = body;
    this.status = status;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({ error: { code: "UNKNOWN", reason: "", field: "", message: response.statusText } }));
  if (!response.ok) throw new ApiError(body.error || {}, response.status);
  return body;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) node.append(child instanceof Node ? child : String(child));
  return node;
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (Number.isInteger(Number(value))) return String(value);
  return Number(value).toPrecision(digits);
}

// A number shown rounded, with its exact value in data-value.
function num(value, digits = 4) {
  return el("td", { class: "num", "data-value": String(value) }, fmt(value, digits));
}

// An error as the RPC reports it: code, reason, field, message.
function errorBox(error) {
  const body = error instanceof ApiError ? error.body : { code: "CLIENT", reason: "", field: "", message: String(error) };
  return el("div", { class: "error", "data-code": body.code || "", "data-reason": body.reason || "", "data-field": body.field || "" },
    el("code", { text: `${body.code} ${body.reason}` }),
    body.field ? ` field ${body.field}: ` : ": ", body.message || "");
}

function showError(target, error) {
  target.replaceChildren(errorBox(error));
}

function table(headers, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => (c instanceof Node && c.tagName === "TD") ? c : el("td", {}, c))))));
}

function enc(part) { return encodeURIComponent(part); }
function parts() { return location.pathname.split("/").filter(Boolean).map(decodeURIComponent); }

function header(crumbs) {
  const bar = el("header", {}, el("a", { class: "brand", href: "/" }, "vitscope explorer"));
  for (const [label, href] of crumbs) bar.append(" / ", href ? el("a", { href }, label) : el("span", {}, label));
  document.body.prepend(bar);
}

// Every unfinished job of the page, watched with one long poll (GET /api/jobs?watch=ID:SEEN,...),
// so that a page with many sections holds one connection, not one per section. A job added
// while a poll waits starts a newer poll; the older one ends when it returns.
const watcher = {
  panels: new Map(),
  generation: 0,

  add(job, panel) {
    this.panels.set(job.id, { panel, seen: job.version });
    this.poll();
  },

  async poll() {
    const generation = ++this.generation;
    while (this.panels.size && generation === this.generation) {
      const watch = [...this.panels].map(([id, w]) => `${id}:${w.seen}`).join(",");
      let body;
      try {
        body = await api(`/api/jobs?watch=${enc(watch)}`);
      } catch (error) {
        for (const w of this.panels.values()) w.panel.finishWithError(error);
        this.panels.clear();
        return;
      }
      for (const job of body.jobs) {
        const watched = this.panels.get(job.id);
        if (!watched || job.version < watched.seen) continue;
        watched.seen = job.version;
        if (FINISHED.includes(job.state)) this.panels.delete(job.id);
        watched.panel.update(job);
      }
    }
  },
};

const FINISHED = ["done", "failed", "cancelled"];

// A section whose content is one job: start, progress, cancel, render or show the error.
// render(result, body) fills the section body; the job's state goes to data-state.
class JobPanel {
  constructor(section, startUrl, render, { auto = true, cancellable = true } = {}) {
    this.section = section;
    this.startUrl = startUrl;
    this.render = render;
    this.controls = el("div", { class: "controls" });
    this.body = el("div", { class: "body" });
    this.progress = el("progress", { max: "1", value: "0", hidden: "" });
    this.state = el("span", { class: "state" });
    this.startButton = el("button", { class: "start", onclick: () => this.start() }, "Compute");
    this.cancelButton = el("button", { class: "cancel", disabled: "", onclick: () => this.cancel() }, "Cancel");
    this.controls.append(this.startButton, " ", cancellable ? this.cancelButton : "", " ", this.progress, this.state);
    section.append(this.controls, this.body);
    if (auto) this.start();
  }

  setState(state, detail = "") {
    this.section.dataset.state = state;
    this.state.textContent = detail ? `${state}: ${detail}` : state;
  }

  async start() {
    this.startButton.disabled = true;
    this.cancelButton.disabled = false;
    this.progress.hidden = false;
    this.progress.value = 0;
    this.body.replaceChildren();
    this.setState("starting");
    try {
      this.job = await api(this.startUrl, { method: "POST" });
    } catch (error) {
      this.finishWithError(error);
      return;
    }
    if (FINISHED.includes(this.job.state)) this.finish(this.job);
    else {
      this.update(this.job);
      watcher.add(this.job, this);
    }
  }

  update(job) {
    if (job.id !== this.job?.id) return; // an earlier job of this section, replaced by a click
    if (FINISHED.includes(job.state)) {
      this.finish(job);
      return;
    }
    this.progress.value = job.fraction;
    this.setState(job.state, job.detail);
  }

  finish(job) {
    if (job.id !== this.job?.id) return;
    this.progress.value = job.fraction;
    this.startButton.disabled = false;
    this.cancelButton.disabled = true;
    this.progress.hidden = job.state !== "done";
    if (job.state === "done") {
      this.render(job.result, this.body);
    } else {
      this.body.replaceChildren(errorBox(new ApiError(job.error || {}, 200)));
    }
    this.setState(job.state);
  }

  finishWithError(error) {
    this.startButton.disabled = false;
    this.cancelButton.disabled = true;
    this.progress.hidden = true;
    showError(this.body, error);
    this.setState("failed");
  }

  async cancel() {
    if (!this.job) return;
    this.cancelButton.disabled = true;
    try { await api(`/api/jobs/${this.job.id}`, { method: "DELETE" }); } catch (error) { showError(this.body, error); }
  }
}

// A small SVG line or bar plot; series: [{points: [[x, y], ...], cls}].
function linePlot(series, width = 260, height = 120, yMax = 1) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "plot");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const xMax = Math.max(1, ...series.flatMap((s) => s.points.map((p) => p[0])));
  for (const s of series) {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", s.cls);
    line.setAttribute("points", s.points.map(([x, y]) => `${(x / xMax) * (width - 4) + 2},${height - 2 - (y / yMax) * (height - 4)}`).join(" "));
    svg.append(line);
  }
  return svg;
}

function barPlot(counts, width = 420, height = 120) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "plot");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const top = Math.max(1, ...counts);
  const w = width / counts.length;
  counts.forEach((count, i) => {
    const bar = document.createElementNS(ns, "rect");
    const h = (count / top) * (height - 4);
    bar.setAttribute("class", "bar");
    bar.setAttribute("x", i * w + 1);
    bar.setAttribute("y", height - h);
    bar.setAttribute("width", Math.max(w - 2, 1));
    bar.setAttribute("height", h);
    bar.setAttribute("data-count", count);
    svg.append(bar);
  });
  return svg;
}

// The unit picker and the upload form, on the model, unit and image pages.
function unitPicker(model, sites, current = {}) {
  const select = el("select", { name: "site", id: "site" }, sites.map((s) => el("option", { value: s.name }, s.name)));
  if (current.site) select.value = current.site;
  const channel = el("input", { type: "number", name: "channel", id: "channel", min: "0", value: String(current.channel ?? 0), style: "width: 6em" });
  const form = el("form", { class: "inline", id: "unit-picker" }, "Unit ", select, " channel ", channel, el("button", { type: "submit" }, "Open"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    location.href = `/models/${enc(model)}/units/${enc(select.value)}/${enc(channel.value)}`;
  });
  return form;
}

function uploadForm(model) {
  const input = el("input", { type: "file", id: "upload", accept: "image/*" });
  const status = el("span", { class: "upload-status" });
  input.addEventListener("change", async () => {
    if (!input.files.length) return;
    try {
      const stored = await api("/api/images", { method: "POST", body: input.files[0] });
      location.href = `/models/${enc(model)}/images/${enc(stored.id)}`;
    } catch (error) {
      status.replaceChildren(errorBox(error));
    }
  });
  return el("span", {}, "Upload an image ", input, status);
}
