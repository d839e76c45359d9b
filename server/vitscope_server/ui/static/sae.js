// An SAE's page: what DescribeModel says of it, its metrics over the samples (EvaluateSae, a
// job) and a latent browser (each latent's statistics over the sample patches, sortable and
// paged, each linking to the latent's unit page).
"use strict";

const LATENTS_PER_PAGE = 32;

function metricsTable(metrics) {
  return table(["metric", "value"], Object.entries(metrics)
    .filter(([, value]) => typeof value === "number")
    .map(([name, value]) => [el("span", { class: "metric" }, name), num(value)]));
}

function saeInfoView(model, name, sae) {
  if (!sae) return el("p", { class: "muted" }, `${model} lists no SAE named ${name}.`);
  return el("div", {}, table(["", ""], [["site", sae.site], ["input width", num(sae.input_width, 6)],
    ["latents", num(sae.width, 6)], ["kind", sae.kind], ["k", num(sae.k, 6)], ["trained as", sae.trained_as]]),
  el("h3", {}, "Recorded with the file"),
  Object.keys(sae.metrics || {}).length ? metricsTable(sae.metrics) : el("p", { class: "muted" }, "No metrics recorded."));
}

function evaluationView(result, body) {
  const quality = { images: result.images, tokens: result.tokens, fvu: result.fvu, explained_variance: result.explained_variance,
    l0: result.l0, dead_fraction: result.dead_fraction, dense_fraction: result.dense_fraction };
  body.replaceChildren(el("div", { id: "quality" }, metricsTable(quality)),
    el("h3", {}, "Latent frequency (log10 of the share of tokens each latent fires on)"), barPlot(result.histogram_counts),
    el("p", { class: "muted", id: "frequency-range" }, `log10 frequency from ${fmt(result.histogram_edges[0], 3)} to ${fmt(result.histogram_edges.at(-1), 3)}; dead latents are counted in dead_fraction only`),
    el("h3", {}, "Splicing the reconstruction into the model"),
    result.splice ? el("div", { id: "splice" }, metricsTable(result.splice)) : el("p", { class: "muted" }, "Not computed."));
}

// The latent browser: one table page at a time, sorted by the chosen column, largest first.
function latentsView(model) {
  return (result, body) => {
    const columns = ["frequency", "mean", "max"];
    const rows = result.frequency.map((_, latent) => ({ latent, frequency: result.frequency[latent], mean: result.mean[latent], max: result.max[latent] }));
    const state = { sort: "frequency", page: 0 };
    const pages = Math.max(1, Math.ceil(rows.length / LATENTS_PER_PAGE));
    const holder = el("div");
    const show = () => {
      const sorted = [...rows].sort((a, b) => b[state.sort] - a[state.sort] || a.latent - b.latent);
      const shown = sorted.slice(state.page * LATENTS_PER_PAGE, (state.page + 1) * LATENTS_PER_PAGE);
      const head = el("tr", {}, el("th", { text: "latent" }), columns.map((c) => el("th", {},
        el("button", { class: "sort", "data-column": c, onclick: () => { state.sort = c; state.page = 0; show(); } }, c === state.sort ? `${c} ▼` : c))));
      const lines = shown.map((r) => el("tr", { class: "latent", "data-latent": String(r.latent) },
        el("td", {}, el("a", { href: `/models/${enc(model)}/units/${enc(result.site)}/${r.latent}` }, `#${r.latent}`)),
        columns.map((c) => num(r[c]))));
      holder.replaceChildren(el("table", {}, el("thead", {}, head), el("tbody", {}, lines)),
        el("div", { class: "controls" },
          el("button", { class: "previous", onclick: () => { state.page = Math.max(0, state.page - 1); show(); } }, "Previous"), " ",
          el("span", { class: "page" }, `page ${state.page + 1} of ${pages}`), " ",
          el("button", { class: "next", onclick: () => { state.page = Math.min(pages - 1, state.page + 1); show(); } }, "Next")));
    };
    show();
    body.replaceChildren(el("p", { class: "muted" }, `${rows.length} latents of ${result.site} over ${result.patches} sample patches`), holder);
  };
}

async function showSae() {
  const [, model, , name] = parts();
  header([[model, `/models/${enc(model)}`], [`SAE ${name}`, null]]);
  const main = document.getElementById("main");
  main.replaceChildren(el("h1", {}, `SAE ${name}`));
  const info = el("section", { id: "sae-info" }, el("h2", {}, "As served"));
  main.append(info);
  api(`/api/models/${enc(model)}`).then((m) => info.append(saeInfoView(m.info.name, name, m.saes[name])),
    (error) => info.append(errorBox(error)));
  const base = `/api/models/${enc(model)}/saes/${enc(name)}`;
  for (const s of [
    { id: "evaluation", title: "Metrics over the samples", url: `${base}/evaluation`, render: evaluationView },
    { id: "latents", title: "Latents", url: `${base}/latents`, render: latentsView(model) },
  ]) {
    const section = el("section", { id: s.id }, el("h2", {}, s.title));
    main.append(section);
    new JobPanel(section, s.url, s.render);
  }
}

showSae();
