// An image's page (a sample or an upload): predictions, identifiability per layer, attribution
// maps with their deletion and insertion curves, the inversion strip by depth, and the
// intervention sections (interventions.js).
"use strict";

function predictionsView(result, body) {
  body.replaceChildren(table(["class", "probability"], result.predictions.map((p) => [
    el("span", { "data-index": String(p.index) }, p.name), num(p.probability)])));
}

function identifiabilityView(result, body) {
  body.replaceChildren(el("p", { class: "muted" }, `target: ${result.target}`),
    table(["block", "identifiable patches %", "", "class token rank"], result.blocks.map((b) => [
      String(b.block), num(b.identifiable_patch_percent),
      el("span", { class: "bar-cell", style: `width: ${b.identifiable_patch_percent * 2}px` }),
      num(b.cls_rank, 6)])));
}

function explanationsView(result, body) {
  body.replaceChildren(el("p", { class: "muted" }, `target ${result.target}, probability ${fmt(result.target_probability)}; deletion (red, lower is better) and insertion (green, higher is better) by patches`),
    el("div", { class: "row" }, result.maps.map((m) => el("div", { class: "tile explanation", "data-method": m.method },
      el("img", { src: m.overlay, alt: m.method }), el("div", {}, m.method),
      linePlot([{ points: m.deletion.map((y, i) => [result.patch_counts[i], y]), cls: "deletion" },
        { points: m.insertion.map((y, i) => [result.patch_counts[i], y]), cls: "insertion" }], 160, 80),
      table(["AUC", ""], [["deletion", num(m.deletion_auc)], ["insertion", num(m.insertion_auc)]])))));
}

function inversionView(result, body) {
  if (!result.available) { body.replaceChildren(el("p", { class: "muted" }, result.why)); return; }
  body.replaceChildren(el("div", { class: "row" }, result.strip.map((d) => el("div", { class: "tile depth", "data-depth": String(d.depth), "data-mse": String(d.mse) },
    el("img", { src: d.png, alt: d.site }), el("div", {}, d.site), el("div", {}, `MSE ${fmt(d.mse, 3)}`)))));
}

async function showImage() {
  const [, model, , image] = parts();
  header([[model, `/models/${enc(model)}`], [image, null]]);
  const main = document.getElementById("main");
  const picture = el("img", { class: "big", id: "picture", src: `/api/images/${enc(image)}`, alt: image });
  picture.addEventListener("error", () => picture.replaceWith(el("p", { class: "muted", id: "picture" }, "The browser cannot show this file.")));
  main.replaceChildren(el("h1", {}, image), el("section", { id: "input" }, el("div", { class: "row" }, picture, uploadForm(model))));
  const base = `/api/models/${enc(model)}/images/${enc(image)}`;
  const methods = new URLSearchParams(location.search).get("methods");
  const sections = [
    { id: "predictions", title: "Predictions", url: `${base}/predictions`, render: predictionsView },
    { id: "identifiability", title: "Identifiability per layer", url: `${base}/identifiability`, render: identifiabilityView },
    { id: "explanations", title: "Attribution maps", url: `${base}/explanations${methods ? `?methods=${enc(methods)}` : ""}`, render: explanationsView },
    { id: "inversion", title: "Inversion strip by depth", url: `${base}/inversion`, render: inversionView },
  ];
  for (const s of sections) {
    const section = el("section", { id: s.id }, el("h2", {}, s.title));
    main.append(section);
    new JobPanel(section, s.url, s.render);
  }
  const query = new URLSearchParams(location.search);
  const ablation = ablationSection(main, base, image);
  try {
    const [described, samples] = await Promise.all([api(`/api/models/${enc(model)}`), api("/api/images")]);
    ablation(described);
    patchingSection(main, base, image, samples.samples, query);
  } catch (error) {
    const section = document.getElementById("ablation");
    showError(section, error);
    section.dataset.state = "failed";
  }
}

showImage();
