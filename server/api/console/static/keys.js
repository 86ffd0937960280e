// Keys (admins): tenants and API keys through /v1/admin: list, create (the secret shown once), revoke.
// A tenant's page calls nothing: it only says who manages keys.
"use strict";

(() => {
  const {api, h, $, fill, show, every, onReady} = Console;

  const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "–");

  async function revoke(button, key) {
    if (!window.confirm(`Revoke ${key.id} (${key.label || key.role})? Clients using it are refused from now on.`)) return;
    button.disabled = true;
    try {
      await api("DELETE", `/v1/admin/keys/${encodeURIComponent(key.id)}`);
      await refresh();
    } catch (e) {
      show($("keys-error"), `revoke ${key.id}: ${e.message}`);
      button.disabled = false;
    }
  }

  function keyRow(key) {
    const action = key.revoked ? null
      : h("button", {type: "button", class: "small danger", onclick: (e) => revoke(e.target, key)}, "revoke");
    return h("tr", {dataset: {key: key.id}, class: key.revoked ? "revoked" : null},
      h("td", {}, h("code", {}, key.id)), h("td", {}, key.role), h("td", {}, key.tenant || "–"),
      h("td", {}, key.label || ""), h("td", {}, when(key.created)), h("td", {class: "revoked-at"}, when(key.revoked)),
      h("td", {class: "actions"}, action));
  }

  function fillTenants(tenants, keys) {
    const active = {};
    for (const k of keys) if (!k.revoked && k.tenant) active[k.tenant] = (active[k.tenant] || 0) + 1;
    fill($("tenants").tBodies[0], tenants.map((t) => h("tr", {dataset: {tenant: t.name}},
      h("td", {}, t.name), h("td", {}, when(t.created)), h("td", {}, active[t.name] || 0))));
    const select = $("key-tenant");
    const chosen = select.value;
    select.replaceChildren(...tenants.map((t) => h("option", {value: t.name}, t.name)));
    if (tenants.some((t) => t.name === chosen)) select.value = chosen;
  }

  async function refresh() {
    const [tenants, keys] = await Promise.all([api("GET", "/v1/admin/tenants"), api("GET", "/v1/admin/keys")]);
    fill($("keys").tBodies[0], keys.data.map(keyRow));
    const live = keys.data.filter((k) => !k.revoked).length;
    $("key-count").textContent = `(${live} active, ${keys.data.length - live} revoked)`;
    fillTenants(tenants.data, keys.data);
    show($("keys-error"), "");
  }

  async function createKey(event) {
    event.preventDefault();
    const role = $("key-role").value;
    const body = {role, label: $("key-label").value.trim()};
    if (role === "tenant") body.tenant = $("key-tenant").value;
    $("new-key").hidden = true;
    try {
      const key = await api("POST", "/v1/admin/keys", body);
      $("new-key-id").textContent = key.id;
      $("new-key-owner").textContent = key.tenant ? `tenant ${key.tenant}` : "an admin";
      $("new-key-secret").textContent = key.key;
      $("new-key").hidden = false;
      $("key-label").value = "";
      await refresh();
    } catch (e) {
      show($("keys-error"), `create key: ${e.message}`);
    }
  }

  async function createTenant(event) {
    event.preventDefault();
    try {
      const tenant = await api("POST", "/v1/admin/tenants", {name: $("tenant-name").value.trim()});
      $("tenant-status").textContent = `created ${tenant.name}`;
      $("tenant-name").value = "";
      await refresh();
      $("key-tenant").value = tenant.name;
    } catch (e) {
      $("tenant-status").textContent = `refused (${e.status}): ${e.message}`;
    }
  }

  onReady((who) => {
    if (who.role !== "admin") { $("not-admin").hidden = false; return; }
    $("admin-only").hidden = false;
    $("key-role").addEventListener("change", (e) => { $("key-tenant").disabled = e.target.value !== "tenant"; });
    $("key-form").addEventListener("submit", createKey);
    $("tenant-form").addEventListener("submit", createTenant);
    every(10000, () => refresh().catch((e) => show($("keys-error"), e.message)));
  });
})();
