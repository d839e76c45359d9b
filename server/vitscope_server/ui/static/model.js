// A model's page: anatomy (blocks, sites, shapes, tokens), unavailable sites, inverters,
// a unit picker and the sample images.
"use strict";

// The model's SAEs (DescribeModel), each linking to its page.
function saesSection(model, saes) {
  const entries = Object.entries(saes);
  return el("section", { id: "saes" }, el("h2", {}, "Sparse autoencoders"),
    entries.length
      ? table(["SAE", "site", "latents", "kind", "FVU", "explained variance", "L0", "dead"], entries.map(([name, s]) => [
          el("a", { href: `/models/${enc(model)}/saes/${enc(name)}` }, name), s.site, num(s.width, 6), s.kind,
          num(s.metrics?.fvu ?? null), num(s.metrics?.explained_variance ?? null), num(s.metrics?.l0 ?? null), num(s.metrics?.dead_fraction ?? null)]))
      : el("p", { class: "muted" }, "No SAE is served for this model."));
}

async function showModel() {
  const [, model] = parts();
  header([[model, null]]);
  const main = document.getElementById("main");
  try {
    const [m, samples] = await Promise.all([api(`/api/models/${enc(model)}`), api("/api/images")]);
    const sites = Object.values(m.sites);
    main.replaceChildren(
      el("h1", {}, m.info.name, el("span", { class: "muted" }, ` ${m.info.family} ${m.info.architecture}`)),
      el("section", { id: "anatomy" }, el("h2", {}, "Anatomy"), table(["", ""], [
        ["blocks", num(m.block_count, 6)], ["embedding width", num(m.embed_dim, 6)],
        ["prefix tokens", num(m.prefix_token_count, 6)], ["patch grid", `${m.grid[0]} × ${m.grid[1]}`],
        ["input", m.input_size.join(" × ")], ["classes", `${m.class_names.length}`],
        ["weights", m.info.weights_identity]])),
      el("section", { id: "explore" }, el("h2", {}, "Explore"), unitPicker(m.info.name, sites), el("p"), uploadForm(m.info.name),
        el("h2", {}, "Samples"),
        el("div", { class: "row", id: "samples" }, samples.samples.map((id) => el("a", { href: `/models/${enc(m.info.name)}/images/${enc(id)}`, class: "tile sample" },
          el("img", { src: `/api/images/${enc(id)}`, alt: id, style: "width: 56px; height: 56px" }), id)))),
      el("section", { id: "sites" }, el("h2", {}, "Sites"), table(["site", "layout", "shape", "tokens", "module"],
        sites.map((s) => [el("a", { href: `/models/${enc(m.info.name)}/units/${enc(s.name)}/0` }, s.name),
          (s.layout || "").replace("SITE_LAYOUT_", "").toLowerCase(), (s.shape || []).join(" × "),
          `${s.prefix_token_count ?? 0} prefix + ${s.grid_height ?? 0}×${s.grid_width ?? 0}`, s.module_path]))),
      el("section", { id: "unavailable" }, el("h2", {}, "Unavailable sites"),
        Object.keys(m.unavailable_sites).length
          ? table(["site", "why"], Object.entries(m.unavailable_sites))
          : el("p", { class: "muted" }, "Every canonical site is served.")),
      el("section", { id: "inverters" }, el("h2", {}, "Inverters"),
        m.inverters.length
          ? table(["store", "max depth", "data", "modules"], m.inverters.map((i) => [i.store, num(i.max_depth, 4), i.data,
              i.modules.map((mod) => `${mod.name} (val MSE ${fmt(mod.best_val_mse, 3)})`).join(", ")]))
          : el("p", { class: "muted" }, "No learned inverter for this model.")),
      saesSection(m.info.name, m.saes || {}),
    );
  } catch (error) {
    showError(main, error);
  }
}

showModel();
