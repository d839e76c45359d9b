// The server page: health, versions, limits and the models it serves.
"use strict";

async function showServer() {
  header([]);
  const main = document.getElementById("main");
  try {
    const data = await api("/api/server");
    const info = data.server;
    main.replaceChildren(
      el("h1", {}, "Server ", el("span", { id: "health", "data-health": data.health, class: "muted" }, data.health)),
      el("section", { id: "models" }, el("h2", {}, "Models"), table(
        ["name", "family", "architecture", "state", "health", "weights"],
        data.models.map((m) => [
          el("a", { href: `/models/${enc(m.name)}` }, m.name + (m.is_default ? " (default)" : "")),
          m.family, m.architecture, m.state + (m.error ? `: ${m.error}` : ""), m.health,
          el("td", { class: "digest" }, m.weights_identity)]))),
      el("section", { id: "versions" }, el("h2", {}, "Versions"), table(["component", "version"], [
        ["vitscope server", info.server_version],
        ["protocol", `${info.protocol} revision ${info.protocol_revision}`],
        ...Object.entries(info.library_versions)])),
      el("section", { id: "limits" }, el("h2", {}, "Limits"), table(["limit", "value"],
        Object.entries(info.limits).map(([name, value]) => [name, num(value, 12)]))),
      el("section", { id: "methods" }, el("h2", {}, "Methods"), el("p", {}, info.methods.join(", "))),
    );
  } catch (error) {
    showError(main, error);
  }
}

showServer();
