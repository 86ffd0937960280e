// Adapters: the list (versions, aliases, owner, rank, targets, size, tier, traffic share and its trend), upload by drop or
// file inputs with the server's refusals shown in place, alias, warm, pin a merged copy, delete.
"use strict";

(() => {
  const {api, h, $, fill, show, bytes, every, onReady} = Console;
  const chosen = {config: null, weights: null};
  let caller = null; // who the key is (from sign-in): owners read "you" to a tenant

  function pick(files) {
    for (const file of files) {
      if (file.name.endsWith(".json")) chosen.config = file;
      else if (file.name.endsWith(".safetensors")) chosen.weights = file;
    }
    const names = [chosen.config, chosen.weights].filter(Boolean).map((f) => `${f.name} (${bytes(f.size)})`);
    $("drop-files").textContent = names.length ? "chosen: " + names.join(", ") : "";
  }

  function shareBar(share) {
    const pct = Math.round((share || 0) * 100);
    return h("span", {class: "share", title: `${pct}% of recent tokens`},
      h("span", {class: "share-bar", style: `width: ${pct}%`}), h("span", {class: "share-label"}, `${pct}%`));
  }

  // Each adapter's share at every refresh since the page opened (the last 5 minutes at most), drawn as a
  // sparkline beside the bar: kept in the tab, so watching the trend costs the server nothing.
  const HISTORY_POINTS = 60;
  const SPARK_W = 60, SPARK_H = 16;
  const shareHistory = new Map();

  function remember(adapters) {
    for (const adapter of adapters) {
      const points = shareHistory.get(adapter.id) || [];
      points.push((adapter.merge && adapter.merge.traffic_share) || 0);
      shareHistory.set(adapter.id, points.slice(-HISTORY_POINTS));
    }
  }

  function sparkline(points) {
    const svgNs = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNs, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
    const title = document.createElementNS(svgNs, "title");
    title.textContent = "share of recent tokens at each refresh since this page opened";
    const line = document.createElementNS(svgNs, "polyline");
    const step = SPARK_W / (HISTORY_POINTS - 1);
    line.setAttribute("points", points.map((share, i) =>
      `${(SPARK_W - (points.length - 1 - i) * step).toFixed(1)},${(SPARK_H - 1 - (SPARK_H - 2) * share).toFixed(1)}`).join(" "));
    svg.append(title, line);
    return svg;
  }

  function tier(adapter) {
    const tags = [h("span", {class: `pill tier-${adapter.resident}`}, adapter.resident)];
    if (adapter.merge && adapter.merge.pinned) tags.push(h("span", {class: "pill"}, "pinned"));
    return tags;
  }

  // The API names the owning tenant only where the key may know it (null: the admins', or someone else's
  // public adapter, whose owner a tenant is never told).
  function owner(adapter) {
    const shared = adapter.public ? h("span", {class: "pill", title: "visible to every tenant"}, "public") : null;
    if (caller.role === "admin") return [adapter.owner === null ? h("span", {class: "muted"}, "admins") : adapter.owner, " ", shared];
    return adapter.owner === caller.tenant ? ["you", " ", shared] : [h("span", {class: "muted"}, "shared with you"), " ", shared];
  }

  async function act(button, method, path, confirmText) {
    if (confirmText && !window.confirm(confirmText)) return;
    button.disabled = true;
    try {
      await api(method, path);
      await refresh();
    } catch (e) {
      show($("adapters-error"), `${method} ${path}: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function row(adapter, aliases) {
    const name = adapter.name;
    const ref = encodeURIComponent(adapter.id);
    const pinned = adapter.merge && adapter.merge.pinned;
    const buttons = [
      h("button", {type: "button", class: "small", onclick: (e) => act(e.target, "POST", `/v1/adapters/${ref}/warm`)}, "warm"),
      h("button", {type: "button", class: "small", onclick: (e) => act(e.target, pinned ? "DELETE" : "POST", `/v1/adapters/${ref}/merge`)},
        pinned ? "unpin merged" : "pin merged"),
      h("button", {type: "button", class: "small danger", onclick: (e) => act(e.target, "DELETE",
        `/v1/adapters/${encodeURIComponent(name)}`,
        `Delete ${name} and all its versions (${adapter.versions.join(", ")})? Requests running on it finish first.`)}, "delete"),
    ];
    return h("tr", {dataset: {adapter: name}},
      h("td", {title: adapter.description || ""}, h("strong", {}, name),
        adapter.description ? h("div", {class: "muted small"}, adapter.description) : null),
      h("td", {}, adapter.versions.join(", ")),
      h("td", {}, (aliases[name] || []).join(", ") || "–"),
      h("td", {class: "owner"}, owner(adapter)),
      h("td", {}, `${adapter.rank} / ${adapter.alpha}`, adapter.use_dora ? " DoRA" : "", adapter.use_rslora ? " rs" : ""),
      h("td", {class: "targets", title: adapter.target_modules.join(", ")}, adapter.target_modules.join(", ")),
      h("td", {}, bytes(adapter.bytes)),
      h("td", {}, tier(adapter)),
      h("td", {class: "traffic"}, shareBar(adapter.merge && adapter.merge.traffic_share),
        sparkline(shareHistory.get(adapter.id) || [])),
      h("td", {class: "actions"}, buttons));
  }

  async function refresh() {
    const [adapters, aliasList] = await Promise.all([
      api("GET", "/v1/adapters?limit=500"), api("GET", "/v1/aliases")]);
    const aliases = {};
    for (const a of aliasList.data) {
      const name = a.target.split("@")[0];
      (aliases[name] = aliases[name] || []).push(`${a.alias} → ${a.target}`);
    }
    remember(adapters.data);
    fill($("adapters").tBodies[0], adapters.data.map((a) => row(a, aliases)));
    $("adapter-count").textContent = adapters.total > adapters.data.length
      ? `(first ${adapters.data.length} of ${adapters.total})` : `(${adapters.total})`;
    $("adapters-empty").hidden = adapters.total > 0;
  }

  function showRefusal(error) {
    const prefix = "invalid adapter: ";
    const problems = error.status === 422 && error.message.startsWith(prefix)
      ? error.message.slice(prefix.length).split("; ") : [];
    $("upload-error-title").textContent = problems.length
      ? `Refused (${error.status}): ${problems.length} problem${problems.length > 1 ? "s" : ""}`
      : `Refused (${error.status}): ${error.message}`;
    fill($("upload-problems"), problems.map((p) => h("li", {}, p)));
    $("upload-errors").hidden = false;
  }

  async function upload(event) {
    event.preventDefault();
    $("upload-errors").hidden = true;
    if (!chosen.config || !chosen.weights) {
      showRefusal({status: "missing files", message: "choose adapter_config.json and adapter_model.safetensors"});
      return;
    }
    const form = new FormData();
    form.append("name", $("upload-name").value.trim());
    form.append("description", $("upload-description").value);
    form.append("adapter_config.json", chosen.config, "adapter_config.json");
    form.append("adapter_model.safetensors", chosen.weights, "adapter_model.safetensors");
    $("upload-submit").disabled = true;
    $("upload-status").textContent = "uploading and validating…";
    try {
      const record = await api("POST", "/v1/adapters", form);
      $("upload-status").textContent = `uploaded ${record.id} (${bytes(record.bytes)})`;
      await refresh();
    } catch (e) {
      $("upload-status").textContent = "";
      showRefusal(e);
    } finally {
      $("upload-submit").disabled = false;
    }
  }

  async function setAlias(event) {
    event.preventDefault();
    const alias = $("alias-name").value.trim();
    try {
      const record = await api("PUT", `/v1/aliases/${encodeURIComponent(alias)}`, {target: $("alias-target").value.trim()});
      $("alias-status").textContent = `${record.alias} → ${record.target}`;
      await refresh();
    } catch (e) {
      $("alias-status").textContent = `refused (${e.status}): ${e.message}`;
    }
  }

  onReady((who) => {
    caller = who;
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      pick(e.dataTransfer.files);
    });
    $("file-config").addEventListener("change", (e) => pick(e.target.files));
    $("file-weights").addEventListener("change", (e) => pick(e.target.files));
    $("upload-form").addEventListener("submit", upload);
    $("alias-form").addEventListener("submit", setAlias);
    every(5000, () => refresh().catch((e) => show($("adapters-error"), e.message)));
  });
})();
