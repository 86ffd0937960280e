// Playground: one prompt through up to four models at once, each answer streamed into its own column
// (SSE from /v1/completions read with fetch + ReadableStream), with token counts and time to first token.
"use strict";

(() => {
  const {api, stream, h, $, onReady} = Console;
  let controller = null;

  async function models() {
    const [listed, adapters, experiments] = await Promise.all([
      api("GET", "/v1/models"), api("GET", "/v1/adapters?limit=500"), api("GET", "/v1/experiments")]);
    const groups = [["base and adapters", listed.data.map((m) => m.id)]];
    const versions = adapters.data.filter((a) => a.versions.length > 1)
      .flatMap((a) => a.versions.map((v) => `${a.name}@${v}`));
    if (versions.length) groups.push(["versions", versions]);
    const running = experiments.data.filter((e) => e.status === "running").map((e) => e.name);
    if (running.length) groups.push(["experiments", running]);
    return groups;
  }

  function fillPickers(groups) {
    const first = groups[0][1];
    document.querySelectorAll(".model-pick").forEach((select, i) => {
      const current = select.value;
      select.replaceChildren(h("option", {value: ""}, "—"),
        ...groups.map(([label, names]) => h("optgroup", {label}, names.map((n) => h("option", {value: n}, n)))));
      select.value = current || (i < 2 && first[i]) || "";
    });
  }

  async function runOne(model, payload, panel, signal) {
    const text = panel.querySelector(".answer-text");
    const stats = panel.querySelector(".answer-stats");
    const started = performance.now();
    let first = null, tokens = 0, usage = null, finish = null, variant = null;
    const report = (state) => {
      const now = performance.now();
      const parts = [`${usage ? usage.completion_tokens : tokens} tokens`];
      if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
      parts.push(`${Math.round(now - started)} ms total`);
      if (usage && first !== null && now > first) {
        parts.push(`${(usage.completion_tokens / ((now - started) / 1000)).toFixed(0)} tokens/s`);
      }
      if (finish) parts.push(`finish: ${finish}`);
      if (variant) parts.push(`variant ${variant}`);
      stats.textContent = parts.join(" · ") + (state ? ` · ${state}` : "");
    };
    try {
      for await (const chunk of stream("/v1/completions", {...payload, model}, signal,
        (headers) => { variant = headers.get("x-experiment-variant"); })) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (first === null) first = performance.now();
          if (choice.text) { text.textContent += choice.text; tokens += 1; panel.dataset.chunks = String(tokens); }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        report("streaming");
      }
      report("");
      panel.dataset.done = "true";
    } catch (e) {
      report(e.name === "AbortError" ? "stopped" : "");
      if (e.name !== "AbortError") panel.append(h("p", {class: "error"}, `${e.status || ""} ${e.message}`));
      panel.dataset.done = "error";
    }
  }

  async function run(event) {
    event.preventDefault();
    const chosen = [...document.querySelectorAll(".model-pick")].map((s) => s.value).filter(Boolean);
    if (!chosen.length) return;
    controller = new AbortController();
    const payload = {
      prompt: $("prompt").value,
      temperature: Number($("temperature").value),
      max_tokens: Number($("max-tokens").value),
      top_p: Number($("top-p").value),
      stream: true,
      stream_options: {include_usage: true},
    };
    if ($("seed").value !== "") payload.seed = Number($("seed").value); // the same draw for every model
    const template = $("answer-template").content;
    const panels = chosen.map((model) => {
      const panel = template.firstElementChild.cloneNode(true);
      panel.dataset.model = model;
      panel.querySelector(".answer-model").textContent = model;
      return panel;
    });
    $("answers").replaceChildren(...panels);
    $("answers").dataset.columns = String(panels.length);
    $("run").disabled = true;
    $("stop").disabled = false;
    await Promise.all(chosen.map((model, i) => runOne(model, payload, panels[i], controller.signal)));
    $("run").disabled = false;
    $("stop").disabled = true;
  }

  onReady(async () => {
    fillPickers(await models());
    $("play-form").addEventListener("submit", run);
    $("stop").addEventListener("click", () => controller && controller.abort());
  });
})();
