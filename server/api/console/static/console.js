// What every console page shares: the key in sessionStorage, API calls with it, sign-in, small DOM helpers.
// The pages are clients of the public /v1 API: whatever a key may see, they show; nothing more.
"use strict";

const Console = (() => {
  const KEY = "loraserve.key";
  const body = document.body;
  const authMode = body.dataset.auth; // "on" | "off" | "starting"
  let readyHandlers = [];
  let whoami = null;
  let signingIn = false; // a refused key during sign-in is reported in place, not by a reload

  class ApiError extends Error {
    constructor(status, error) {
      super(error && error.message ? error.message : `HTTP ${status}`);
      this.status = status;
      this.code = error && error.code;
      this.param = error && error.param;
    }
  }

  function headers(extra) {
    const key = sessionStorage.getItem(KEY);
    const out = Object.assign({}, extra || {});
    if (key) out.Authorization = "Bearer " + key;
    return out;
  }

  // fetch with the key; JSON in and out; an error answer (OpenAI's shape) becomes an ApiError.
  async function api(method, path, payload, options) {
    const init = {method, headers: headers()};
    if (payload instanceof FormData) init.body = payload;
    else if (payload !== undefined) {
      init.body = JSON.stringify(payload);
      init.headers["Content-Type"] = "application/json";
    }
    Object.assign(init, options || {});
    const response = await fetch(path, init);
    if (response.status === 401 && authMode === "on" && !signingIn) signOut("The key was refused: sign in again.");
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = {error: {message: text}}; }
    if (!response.ok) throw new ApiError(response.status, data && data.error);
    return data;
  }

  // A streamed POST: yields each server-sent event's parsed JSON until [DONE].
  async function* stream(path, payload, signal, onHeaders) {
    const response = await fetch(path, {method: "POST", signal, body: JSON.stringify(payload),
      headers: headers({"Content-Type": "application/json", Accept: "text/event-stream"})});
    if (!response.ok) {
      let error = null;
      try { error = (await response.json()).error; } catch (e) { /* not JSON */ }
      throw new ApiError(response.status, error);
    }
    if (onHeaders) onHeaders(response.headers);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  // h("td", {class: "x"}, "text", child): elements with text nodes only, never HTML from the API.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k === "style") el.style.cssText = v; // CSSOM: allowed by the page's style-src 'self'

      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function $(id) { return document.getElementById(id); }

  function fill(tbody, rows) { tbody.replaceChildren(...rows); }

  function show(el, message) {
    el.textContent = message || "";
    el.hidden = !message;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function num(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const value = Number(x);
    if (Math.abs(value) < 1e-12) return "0";
    if (Math.abs(value) < 1e-3) return value.toExponential((digits || 3) - 1);
    if (Math.abs(value) >= 1000) return String(Math.round(value));
    return value.toPrecision(digits || 3).replace(/\.?0+(e|$)/, "$1");
  }

  function seconds(x) { return x === null || x === undefined ? "–" : `${(x * 1000).toFixed(0)} ms`; }

  function every(ms, fn) {
    let timer = null;
    const tick = async () => {
      try { await fn(); } finally { timer = setTimeout(tick, ms); }
    };
    tick();
    return () => clearTimeout(timer);
  }

  function onReady(fn) {
    if (whoami) fn(whoami); else readyHandlers.push(fn);
  }

  function ready(who) {
    whoami = who;
    $("sign-in").hidden = true;
    $("main").hidden = false;
    const label = who.auth ? (who.role === "admin" ? "admin" : `tenant ${who.tenant}`) : "anonymous admin (auth off)";
    $("who-name").textContent = label;
    $("who").hidden = false;
    $("sign-out").hidden = !who.auth;
    body.dataset.role = who.role;
    const handlers = readyHandlers;
    readyHandlers = [];
    handlers.forEach((fn) => fn(who));
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    if (message !== undefined) sessionStorage.setItem(KEY + ".message", message);
    location.reload();
  }

  async function signIn(key) {
    sessionStorage.setItem(KEY, key);
    signingIn = true;
    try {
      const state = await api("GET", "/v1/server/state");
      signingIn = false;
      ready(state.caller);
    } catch (e) {
      signingIn = false;
      sessionStorage.removeItem(KEY);
      $("sign-in").hidden = false;
      show($("sign-in-error"), e.status === 401 ? "That key was refused: " + e.message : e.message);
    }
  }

  function start() {
    $("sign-out").addEventListener("click", () => signOut(""));
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      signIn($("api-key").value.trim());
    });
    if (authMode === "starting") return;
    const message = sessionStorage.getItem(KEY + ".message");
    sessionStorage.removeItem(KEY + ".message");
    if (authMode === "off") { signIn(""); return; }
    const key = sessionStorage.getItem(KEY);
    if (key) { signIn(key); return; }
    $("sign-in").hidden = false;
    show($("sign-in-error"), message || "");
    $("api-key").focus();
  }

  start();
  return {api, stream, h, $, fill, show, bytes, num, seconds, every, onReady, ApiError};
})();
