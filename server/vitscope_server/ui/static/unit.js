// A unit's page: a site's channel. Each section is a JobPanel over one endpoint, so a later
// section (an SAE latent's, an intervention panel) is one more entry in sections().
"use strict";

function visualizationView(result, body) {
  body.replaceChildren(el("div", { class: "row" },
    el("img", { class: "big", id: "optimized", src: result.png, alt: "optimized image" }),
    table(["", ""], [["objective", num(result.objective)], ["steps", num(result.parameters.steps, 6)],
      ["copies", num(result.parameters.copies, 6)], ["image size", num(result.parameters.image_size, 6)]])));
}

function classEffectsView(result, body) {
  if (!result.available) { body.replaceChildren(el("p", { class: "muted" }, result.why)); return; }
  body.replaceChildren(table(["class", "score"], result.classes.map((c) => [
    el("span", { "data-index": String(c.index) }, c.name), num(c.score)])));
}

function histogramView(result, body) {
  body.replaceChildren(barPlot(result.counts), table(["", ""], [
    ["patches", num(result.count, 8)], ["mean", num(result.mean)], ["min", num(result.min)], ["max", num(result.max)]]));
}

function topImagesView(model) {
  return (result, body) => {
    body.replaceChildren(el("p", { class: "muted" }, `${result.scanned} images scanned`),
      el("div", { class: "row" }, result.images.map((image) => el("div", { class: "tile top-image", "data-index": String(image.index), "data-name": image.name, "data-score": String(image.score) },
        el("img", { src: image.overlay, alt: image.name }),
        image.name.startsWith("s-") ? el("a", { href: `/models/${enc(model)}/images/${enc(image.name)}` }, image.name) : image.name,
        el("div", {}, `score ${fmt(image.score)}`)))));
  };
}

function sections(model, site, channel, query) {
  const base = `/api/models/${enc(model)}/units/${enc(site)}/${enc(channel)}`;
  const steps = query.get("steps");
  const folder = query.get("folder");
  return [
    { id: "visualization", title: "Optimized image", url: `${base}/visualization${steps ? `?steps=${enc(steps)}` : ""}`, render: visualizationView, auto: query.get("visualize") === "1" },
    { id: "class-effects", title: "Class effects (top classes of its memory)", url: `${base}/class_effects`, render: classEffectsView },
    { id: "histogram", title: "Activation over the sample patches", url: `${base}/histogram`, render: histogramView },
    { id: "ablation", title: "Ablation: the channel zeroed on the samples", url: `${base}/ablation`, render: unitAblationView(model) },
    { id: "top-images", title: folder ? `Top images in ${folder}` : "Top sample images", url: `${base}/top_images${folder ? `?folder=${enc(folder)}` : ""}`, render: topImagesView(model) },
  ];
}

// Top images over an allowed folder of the server (--image-roots) instead of the samples.
function folderForm(folder) {
  const input = el("input", { type: "text", id: "folder", name: "folder", value: folder || "", placeholder: "an allowed image folder on the server", style: "width: 24em" });
  const form = el("form", { class: "inline", id: "folder-form" }, "Scan ", input, el("button", { type: "submit" }, "Scan"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams(location.search);
    if (input.value) query.set("folder", input.value); else query.delete("folder");
    location.search = query.toString();
  });
  return form;
}

async function showUnit() {
  const [, model, , site, channel] = parts();
  header([[model, `/models/${enc(model)}`], [`${site} #${channel}`, null]]);
  const main = document.getElementById("main");
  main.replaceChildren(el("h1", {}, `${site} channel ${channel}`));
  const picker = el("section", { id: "picker" });
  main.append(picker);
  api(`/api/models/${enc(model)}`).then((m) => picker.append(unitPicker(m.info.name, Object.values(m.sites), { site, channel })),
    (error) => showError(picker, error));
  const query = new URLSearchParams(location.search);
  for (const s of sections(model, site, channel, query)) {
    const section = el("section", { id: s.id }, el("h2", {}, s.title));
    if (s.id === "top-images") section.append(folderForm(query.get("folder")));
    main.append(section);
    new JobPanel(section, s.url, s.render, { auto: s.auto ?? true });
  }
}

showUnit();
