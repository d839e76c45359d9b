"use strict";
const query = new URLSearchParams(location.search);
document.getElementById("next").value = query.get("next") || "/";
document.getElementById("failed").hidden = !query.has("failed");
