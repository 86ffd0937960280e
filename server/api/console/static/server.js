// Server: the engine at a glance from GET /v1/server/state (its latest snapshot), every 2 s, with
// tokens/s computed between two snapshots and charted; admins also see how many tenants and keys (the Keys
// page manages them).
"use strict";

(() => {
  const {api, h, $, fill, show, bytes, num, every, onReady} = Console;
  const HISTORY = 90;
  const series = [[], [], [], []]; // time, tokens/s, running, waiting
  let previous = null;
  let chart = null;

  function plot() {
    const el = $("tps-chart");
    if (series[0].length < 2) return; // a time axis needs two readings
    if (!chart) {
      chart = new uPlot({
        width: Math.max(320, Math.min(900, el.clientWidth || 720)), height: 200,
        scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(1, max)]}},
        series: [{}, {label: "tokens/s", stroke: "#1f5fbf", width: 2},
          {label: "running", stroke: "#2f9e44", width: 1}, {label: "waiting", stroke: "#e8590c", width: 1}],
        axes: [{}, {size: 50}],
      }, series, el);
    } else {
      chart.setData(series);
    }
  }

  function render(state) {
    $("engine-model").textContent = `${state.model} · loraserve ${state.version}`;
    $("s-running").textContent = state.requests.running;
    $("s-waiting").textContent = state.requests.waiting;
    $("s-kv").textContent = `${(state.kv_cache.usage * 100).toFixed(1)}%`;
    $("s-slots").textContent = `${state.slots.used} / ${state.slots.capacity}`;
    $("s-merged").textContent = `${state.merged.count} (${bytes(state.merged.bytes)} of ${bytes(state.merged.budget)})`;
    let tps = null;
    if (previous && state.time > previous.time) {
      tps = (state.counters.tokens_generated - previous.counters.tokens_generated) / (state.time - previous.time);
      $("s-tps").textContent = num(tps, 3);
      series[0].push(state.time); series[1].push(tps);
      series[2].push(state.requests.running); series[3].push(state.requests.waiting);
      if (series[0].length > HISTORY) series.forEach((s) => s.shift());
      plot();
    }
    previous = state;
    const where = (name) => [state.merged.adapters.includes(name) ? "merged" : null,
      state.device_adapters.includes(name) ? "device slot" : null,
      state.merged.pinned.includes(name) ? "pinned" : null, state.merged.pending.includes(name) ? "merge pending" : null,
      state.retiring.includes(name) ? "retiring" : null].filter(Boolean).join(", ");
    const names = [...new Set([...state.device_adapters, ...state.merged.adapters, ...Object.keys(state.traffic_shares)])].sort();
    fill($("engine-adapters").tBodies[0], names.map((n) => h("tr", {dataset: {adapter: n}},
      h("td", {}, n), h("td", {}, where(n) || "–"),
      h("td", {}, `${Math.round((state.traffic_shares[n] || 0) * 100)}%`))));
    const c = state.counters;
    $("s-counters").textContent = `${c.steps} steps (${num(c.step_seconds)} s), ${c.tokens_generated} tokens, ` +
      `${c.preemptions} preemptions, ${c.slot_loads} slot loads, ${c.slot_evictions} evictions, ` +
      `${c.merge_promotions} merges, ${c.merge_demotions} demotions, ${c.merge_failures} failed merges`;
    $("state-updated").textContent = new Date().toLocaleTimeString();
  }

  async function admin() {
    const [tenants, keys] = await Promise.all([api("GET", "/v1/admin/tenants"), api("GET", "/v1/admin/keys")]);
    const revoked = keys.data.filter((k) => k.revoked).length;
    $("tenant-count").textContent = tenants.data.length;
    $("key-count").textContent = keys.data.length - revoked;
    $("revoked-count").textContent = revoked;
    $("admin").hidden = false;
  }

  onReady((who) => {
    every(2000, () => api("GET", "/v1/server/state").then((s) => { show($("state-error"), ""); render(s); })
      .catch((e) => show($("state-error"), e.message)));
    if (who.role === "admin" && who.auth) every(10000, () => admin().catch((e) => show($("state-error"), e.message)));
  });
})();
