// Intervention sections (Intervene): on the image page, ablating a clicked patch or head and a
// patching heatmap from a second image; on the unit page, ablating the unit over the samples.
"use strict";

function range(n) { return [...Array(n).keys()]; }

function rankedTable(cls, title, predictions) {
  return el("div", { class: `ranked ${cls}` }, el("h3", {}, title), table(["class", "probability"],
    predictions.map((p) => [el("span", { "data-index": String(p.index) }, p.name), num(p.probability)])));
}

function ablationView(result, body) {
  const change = result.ablated_probability - result.base_probability;
  body.replaceChildren(el("p", { class: "muted" }, `zeroed ${result.what} (${result.site}); probability of the prediction ${result.target}:`),
    el("table", { class: "target" }, el("tbody", {}, el("tr", {}, el("td", {}, "before"), num(result.base_probability),
      el("td", {}, "after"), num(result.ablated_probability), el("td", {}, "change"), num(change)))),
    el("div", { class: "row" }, rankedTable("base", "Top predictions before", result.base),
      rankedTable("ablated", "after", result.ablated)));
}

// A clickable grid over the picture (one button per patch) and a block x head table: a click
// starts the section's job for that patch (at the chosen block) or that head.
function ablationSection(main, base, image) {
  const section = el("section", { id: "ablation", "data-state": "loading" }, el("h2", {}, "Ablation: click a patch or a head"));
  main.append(section);
  return (described) => {
    const blocks = described.block_count;
    const [rows, columns] = described.grid.map(Number);
    const block = el("select", { id: "ablation-block" }, range(blocks).map((b) => el("option", { value: String(b) }, `after block ${b}`)));
    block.value = "0"; // after later blocks a token carries the other patches' content
    const patches = el("div", { class: "patch-grid", id: "patch-grid", style: `grid-template-columns: repeat(${columns}, 1fr); grid-template-rows: repeat(${rows}, 1fr)` },
      range(rows).flatMap((r) => range(columns).map((c) => el("button", { type: "button", class: "patch", "data-row": String(r), "data-column": String(c), title: `patch (${r}, ${c})` }))));
    const heads = range(blocks).map((b) => Number((described.sites[`blocks.${b}.attn.heads`]?.shape || [0, 0]).at(-2)));
    const headTable = table(["block", "heads"], range(blocks).map((b) => [String(b),
      el("span", {}, range(heads[b]).map((h) => el("button", { type: "button", class: "head", "data-block": String(b), "data-head": String(h), title: `block ${b} head ${h}` }, String(h))))]));
    headTable.id = "heads";
    section.append(el("div", { class: "row" },
      el("div", {}, el("div", { class: "over" }, el("img", { class: "big", src: `/api/images/${enc(image)}`, alt: image }), patches),
        el("label", {}, "Patch token zeroed ", block)),
      el("div", {}, el("p", { class: "muted" }, "Head zeroed (its contribution to the block's attention output)"), headTable)));
    const center = [Math.floor(rows / 2), Math.floor(columns / 2)];
    const patchUrl = ([r, c]) => `${base}/ablation?block=${enc(block.value)}&row=${r}&column=${c}`;
    patches.querySelector(`button[data-row="${center[0]}"][data-column="${center[1]}"]`)?.classList.add("selected");
    const panel = new JobPanel(section, patchUrl(center), ablationView);
    const choose = (button, url) => {
      section.querySelectorAll("button.selected").forEach((b) => b.classList.remove("selected"));
      button.classList.add("selected");
      panel.startUrl = url;
      panel.start();
    };
    patches.addEventListener("click", (event) => {
      const cell = event.target.closest("button.patch");
      if (cell) choose(cell, patchUrl([cell.dataset.row, cell.dataset.column]));
    });
    headTable.addEventListener("click", (event) => {
      const cell = event.target.closest("button.head");
      if (cell) choose(cell, `${base}/ablation?block=${cell.dataset.block}&head=${cell.dataset.head}`);
    });
  };
}

// Diverging colors: toward the source's metric in blue, away in red, full at +-scale.
function effectColor(value, scale) {
  if (value === null) return "#e4e7ec";
  const v = Math.max(-1, Math.min(1, value / scale));
  return v >= 0 ? `rgba(49, 85, 214, ${v.toFixed(3)})` : `rgba(180, 35, 24, ${(-v).toFixed(3)})`;
}

function heatmap(grid, scale, size = 112) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "plot heatmap");
  svg.setAttribute("width", size);
  svg.setAttribute("height", size);
  const h = size / grid.length;
  grid.forEach((row, r) => row.forEach((value, c) => {
    const cell = document.createElementNS(ns, "rect");
    const w = size / row.length;
    cell.setAttribute("class", "cell");
    cell.setAttribute("x", c * w);
    cell.setAttribute("y", r * h);
    cell.setAttribute("width", w);
    cell.setAttribute("height", h);
    cell.setAttribute("fill", effectColor(value, scale));
    cell.setAttribute("data-value", String(value));
    svg.append(cell);
  }));
  return svg;
}

function patchingView(result, body) {
  // One color scale for every block: the largest effect of any patch, at least 0.01.
  const scale = Math.max(0.01, ...result.blocks.flatMap((b) => b.normalized.flat().filter((v) => v !== null).map(Math.abs)));
  body.replaceChildren(el("p", { class: "muted" }, `the residual stream after each block patched from ${result.source}, one patch at a time; ${result.metric} between ${result.target} and ${result.other}, normalized: 0 is the image's own (${fmt(result.base_metric)}), 1 the source's (${fmt(result.source_metric)}); blue toward the source, red away (full color at ±${fmt(scale, 3)}), grey undefined`),
    el("div", { class: "row" }, result.blocks.map((b) => el("div", { class: "tile", "data-block": String(b.block) },
      heatmap(b.normalized, scale), el("div", {}, `block ${b.block}`)))),
    el("table", { class: "metrics" }, el("tbody", {}, el("tr", {}, el("td", {}, "base"), num(result.base_metric),
      el("td", {}, "source"), num(result.source_metric)))));
}

// The source: a sample or an upload; `?source=ID` starts the sweep at once.
function patchingSection(main, base, image, samples, query) {
  const section = el("section", { id: "patching" }, el("h2", {}, "Activation patching from a second image"));
  main.append(section);
  const chosen = query.get("source");
  const options = samples.filter((s) => s !== image);
  if (chosen && !options.includes(chosen)) options.unshift(chosen);
  const source = el("select", { id: "patching-source" }, options.map((s) => el("option", { value: s }, s)));
  if (chosen) source.value = chosen;
  const upload = el("input", { type: "file", id: "patching-upload", accept: "image/*" });
  const status = el("span", { class: "upload-status" });
  const perForward = query.get("variants_per_forward");
  const url = () => `${base}/patching?source=${enc(source.value)}${perForward ? `&variants_per_forward=${enc(perForward)}` : ""}`;
  section.append(el("div", { class: "controls" }, "Source ", source, " or upload one ", upload, status));
  const panel = new JobPanel(section, url(), patchingView, { auto: Boolean(chosen) });
  source.addEventListener("change", () => { panel.startUrl = url(); });
  upload.addEventListener("change", async () => {
    if (!upload.files.length) return;
    try {
      const stored = await api("/api/images", { method: "POST", body: upload.files[0] });
      source.prepend(el("option", { value: stored.id }, stored.id));
      source.value = stored.id;
      panel.startUrl = url();
      status.replaceChildren();
    } catch (error) {
      status.replaceChildren(errorBox(error));
    }
  });
}

function unitAblationView(model) {
  return (result, body) => body.replaceChildren(el("p", { class: "muted" }, `zeroing the channel changes ${result.changed} of ${result.images.length} predictions; the probability of each image's own prediction changes by ${fmt(result.mean_change)} on average`),
    table(["image", "prediction", "after", "its probability", "after", "change"], result.images.map((r) => [
      el("a", { "data-image": r.image, href: `/models/${enc(model)}/images/${enc(r.image)}` }, r.image), r.base.name, r.ablated.name,
      num(r.base_probability), num(r.ablated_probability), num(r.ablated_probability - r.base_probability)])));
}
