// Experiments: create, start/pause/stop, and the selected experiment's results refreshed every 3 s:
// requests, errors, scores with their 95% intervals drawn as a chart, latency percentiles, p-values,
// the verdict, and promotion of the winner to an alias.
"use strict";

(() => {
  const {api, h, $, fill, show, num, seconds, every, onReady} = Console;
  const NEXT = {draft: ["running", "stopped"], running: ["paused", "stopped"], paused: ["running", "stopped"], stopped: []};
  const VERB = {running: "start", paused: "pause", stopped: "stop"};
  let selected = decodeURIComponent(location.hash.slice(1)) || null;
  let modelNames = [];
  let chart = null;

  async function setStatus(name, status, button) {
    if (status === "stopped" && !window.confirm(`Stop ${name}? A stopped experiment cannot run again.`)) return;
    button.disabled = true;
    try {
      await api("PATCH", `/v1/experiments/${encodeURIComponent(name)}`, {status});
      await refreshList();
      if (name === selected) await refreshResults();
    } catch (e) {
      show($("experiments-error"), `${name}: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function select(name) {
    selected = name;
    history.replaceState(null, "", "#" + encodeURIComponent(name));
    if (chart) { chart.destroy(); chart = null; }
    refreshResults();
  }

  function experimentRow(e) {
    const verb = (s) => (e.status === "paused" && s === "running" ? "resume" : VERB[s]);
    return h("tr", {dataset: {experiment: e.name}, class: e.name === selected ? "selected" : null},
      h("td", {}, h("a", {href: "#" + encodeURIComponent(e.name), onclick: (ev) => { ev.preventDefault(); select(e.name); }},
        e.name)),
      h("td", {}, h("span", {class: `pill status-${e.status}`}, e.status)),
      h("td", {}, e.variants.map((v) => `${v.name}: ${v.adapter} (${Math.round(v.share * 100)}%${v.control ? ", control" : ""})`)
        .join(" · ")),
      h("td", {}, e.min_samples),
      h("td", {class: "actions"}, NEXT[e.status].map((s) =>
        h("button", {type: "button", class: "small" + (s === "stopped" ? " danger" : ""),
          onclick: (ev) => setStatus(e.name, s, ev.target)}, verb(s)))));
  }

  async function refreshList() {
    const list = await api("GET", "/v1/experiments");
    fill($("experiments").tBodies[0], list.data.map(experimentRow));
    $("experiments-empty").hidden = list.data.length > 0;
    show($("experiments-error"), "");
    if (!selected && list.data.length) select(list.data[list.data.length - 1].name);
  }

  function percentiles(p) { return p ? `${seconds(p.p50)} / ${seconds(p.p90)} / ${seconds(p.p99)}` : "–"; }

  function resultRow(v) {
    const f = v.feedback, c = v.comparison;
    return h("tr", {dataset: {variant: v.name}},
      h("td", {}, v.name, v.control ? h("span", {class: "pill"}, "control") : null),
      h("td", {}, v.adapter),
      h("td", {class: "requests"}, v.requests),
      h("td", {}, v.errors),
      h("td", {class: "scores"}, f.count),
      h("td", {}, f.mean === null ? "–" : `${num(f.mean)}${f.ci95 ? ` [${num(f.ci95[0])}, ${num(f.ci95[1])}]` : ""}`),
      h("td", {}, percentiles(v.latency_seconds.ttft)),
      h("td", {}, percentiles(v.latency_seconds.total)),
      h("td", {class: "p-value"}, c ? num(c.p_value) : "–"),
      h("td", {}, c ? (c.significant ? "yes" : "no") : "–"));
  }

  // Each variant's mean score as a point with its 95% interval as a whisker (a uPlot draw hook).
  function drawChart(results) {
    const el = $("ci-chart");
    const variants = results.variants;
    const points = variants.map((v) => ({name: v.name, mean: v.feedback.mean, ci: v.feedback.ci95}));
    el.dataset.points = JSON.stringify(points);
    if (chart) chart.destroy();
    const values = points.flatMap((p) => [p.mean, ...(p.ci || [])]).filter((x) => x !== null);
    const binary = results.score_type === "binary";
    const lo = binary ? 0 : Math.min(0, ...values), hi = binary ? 1 : Math.max(1, ...values);
    const whiskers = (u) => {
      const ctx = u.ctx;
      ctx.save();
      ctx.strokeStyle = "#1f5fbf";
      ctx.lineWidth = 2 * devicePixelRatio;
      points.forEach((p, i) => {
        if (!p.ci) return;
        const x = u.valToPos(i, "x", true), y0 = u.valToPos(p.ci[0], "y", true), y1 = u.valToPos(p.ci[1], "y", true);
        const w = 8 * devicePixelRatio;
        ctx.beginPath();
        ctx.moveTo(x, y0); ctx.lineTo(x, y1);
        ctx.moveTo(x - w, y0); ctx.lineTo(x + w, y0);
        ctx.moveTo(x - w, y1); ctx.lineTo(x + w, y1);
        ctx.stroke();
      });
      ctx.restore();
    };
    chart = new uPlot({
      width: Math.max(320, Math.min(720, el.clientWidth || 640)), height: 220,
      legend: {show: false}, cursor: {show: false},
      scales: {x: {time: false, range: [-0.5, points.length - 0.5]}, y: {range: [lo - (hi - lo) * 0.05, hi + (hi - lo) * 0.05]}},
      axes: [
        {splits: () => points.map((_, i) => i), values: (u, splits) => splits.map((i) => (points[i] ? points[i].name : ""))},
        {label: "score (mean, 95% CI)", size: 60},
      ],
      series: [{}, {label: "mean score", stroke: "#1f5fbf", width: 0, points: {show: true, size: 12, fill: "#1f5fbf"}}],
      hooks: {draw: [whiskers]},
    }, [points.map((_, i) => i), points.map((p) => p.mean)], el);
  }

  async function refreshResults() {
    const name = selected;
    if (!name) return;
    let results, experiment;
    try {
      [results, experiment] = await Promise.all([
        api("GET", `/v1/experiments/${encodeURIComponent(name)}/results`),
        api("GET", `/v1/experiments/${encodeURIComponent(name)}`)]);
    } catch (e) {
      if (e.status === 404 && name === selected) { selected = null; $("results").hidden = true; return; }
      throw e;
    }
    if (name !== selected) return; // another experiment was chosen meanwhile
    $("results").hidden = false;
    $("results-name").textContent = results.experiment;
    $("results-status").textContent = results.status;
    const verdict = results.verdict;
    $("verdict").textContent = verdict.message;
    $("verdict").dataset.winner = verdict.winner || "";
    $("verdict").className = "verdict" + (verdict.winner ? " winner" : "");
    fill($("results-table").tBodies[0], results.variants.map(resultRow));
    drawChart(results);
    const promotion = experiment.promotion;
    $("promote").disabled = !verdict.winner;
    $("promote").textContent = verdict.winner ? `Promote ${verdict.winner}` : "Promote the winner (none yet)";
    if (promotion) $("promote-status").textContent =
      `promoted: ${promotion.alias} → ${promotion.adapter} (variant ${promotion.variant})`;
    $("results-updated").textContent = new Date().toLocaleTimeString();
  }

  async function promote(event) {
    event.preventDefault();
    const alias = $("promote-alias").value.trim();
    try {
      await api("POST", `/v1/experiments/${encodeURIComponent(selected)}/promote`, {alias});
      await refreshResults();
    } catch (e) {
      $("promote-status").textContent = `refused (${e.status}): ${e.message}`;
    }
  }

  function variantRow(name, adapter) {
    const options = modelNames.map((m) => h("option", {value: m, selected: m === adapter}, m));
    return h("div", {class: "row variant"},
      h("label", {}, "Variant ", h("input", {class: "v-name", required: true, value: name, maxlength: 64, size: 8})),
      h("label", {}, "Model ", h("select", {class: "v-adapter"}, options)),
      h("label", {}, "Weight ", h("input", {class: "v-weight", type: "number", min: 0, step: "any", value: 1, size: 4})),
      h("label", {}, h("input", {class: "v-control", type: "radio", name: "control", checked: name === "A"}), " control"),
      h("button", {type: "button", class: "link", onclick: (e) => e.target.closest(".variant").remove()}, "remove"));
  }

  async function create(event) {
    event.preventDefault();
    const variants = [...document.querySelectorAll("#variant-rows .variant")].map((row) => ({
      name: row.querySelector(".v-name").value.trim(),
      adapter: row.querySelector(".v-adapter").value,
      weight: Number(row.querySelector(".v-weight").value),
      control: row.querySelector(".v-control").checked,
    }));
    const body = {name: $("exp-name").value.trim(), description: $("exp-description").value, variants,
      status: $("exp-status").value, min_samples: Number($("exp-min-samples").value)};
    try {
      const created = await api("POST", "/v1/experiments", body);
      show($("experiment-form-error"), "");
      await refreshList();
      select(created.name);
    } catch (e) {
      show($("experiment-form-error"), `refused (${e.status}): ${e.message}`);
    }
  }

  onReady(async () => {
    modelNames = (await api("GET", "/v1/models")).data.map((m) => m.id);
    const rows = $("variant-rows");
    rows.append(variantRow("A", modelNames[1] || modelNames[0]), variantRow("B", modelNames[2] || modelNames[0]));
    $("add-variant").addEventListener("click", () =>
      rows.append(variantRow(String.fromCharCode(65 + rows.children.length), modelNames[0])));
    $("experiment-form").addEventListener("submit", create);
    $("promote-form").addEventListener("submit", promote);
    every(3000, async () => {
      try {
        await refreshList();
        await refreshResults();
      } catch (e) {
        show($("experiments-error"), e.message);
      }
    });
  });
})();
