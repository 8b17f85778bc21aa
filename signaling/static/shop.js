// Room stock as UI: the same numbers the overlay burns into the picture, kept live by room events.
"use strict";

const shop = (() => {
  const CURRENCY = { USD: "$", EUR: "€", GBP: "£", JPY: "¥", CNY: "¥", KRW: "₩", THB: "฿", INR: "₹" };
  function money(amount, currency) {
    const s = CURRENCY[(currency || "").toUpperCase()];
    return s ? s + amount : `${amount} ${currency || ""}`.trim();
  }
  function headline(v) {
    if (v.status === "syncing" || v.sellable === null) return "Syncing stock...";
    if (v.status === "sold_out" || v.sellable <= 0) return "Sold out";
    if (v.status === "low" || v.status === "critical") return `Only ${v.sellable} left`;
    return `${v.sellable} in stock`;
  }
  function variantLabel(v) {
    const a = v.attributes || {};
    return a.size || a.colour || a.color || a.variant || v.name;
  }
  function timer(endsAt) {
    const left = Math.max(0, Math.ceil(endsAt - Date.now() / 1000));
    return `${String(Math.floor(left / 60)).padStart(2, "0")}:${String(left % 60).padStart(2, "0")}`;
  }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k.startsWith("on")) node[k] = v; else node.setAttribute(k, v);
    }
    return fill(node, ...children);
  }
  // Replaces node's children; null/undefined are skipped (replaceChildren would print "null").
  function fill(node, ...children) {
    node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));  // text nodes: never HTML
    return node;
  }
  // A random id that needs no secure context (crypto.randomUUID does: a page over plain HTTP has none).
  function uuid() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // Keeps {sku -> view} plus the featured SKU; calls render() on every change.
  class RoomStock {
    constructor(roomId, render) {
      this.roomId = roomId; this.render = render; this.views = new Map(); this.order = [];
      this.featured = null; this.region = "";
    }
    async load() {
      const [stock, overlay] = await Promise.all([
        fetch(`/api/rooms/${encodeURIComponent(this.roomId)}/stock`).then((r) => r.ok ? r.json() : null),
        fetch(`/api/rooms/${encodeURIComponent(this.roomId)}/overlay`).then((r) => r.ok ? r.json() : null),
      ]);
      if (stock) { this.region = stock.region; this.apply(stock.skus, true); }
      if (overlay) this.featured = overlay.featured_sku;
      this.render(this);
    }
    apply(skus, replace) {
      if (replace) { this.views.clear(); this.order = []; }
      for (const v of skus) { if (!this.views.has(v.sku)) this.order.push(v.sku); this.views.set(v.sku, v); }
    }
    onEvent(ev) {
      if (ev.type === "stock") { this.apply(ev.skus, false); this.render(this); }
      else if (ev.type === "overlay") { this.featured = ev.featured_sku; this.render(this); }
    }
    list() { return this.order.map((s) => this.views.get(s)).filter(Boolean); }
    featuredView() { return this.views.get(this.featured) || this.list()[0] || null; }
  }

  async function placeOrder(roomId, sku, region, buyer) {
    const body = { sku, quantity: 1, region, idempotency_key: uuid(), buyer };
    const resp = await fetch(`/api/rooms/${encodeURIComponent(roomId)}/orders`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const data = await resp.json();
    if (resp.status !== 201) throw new Error(data.error ? data.error.message : `HTTP ${resp.status}`);
    return data.order;
  }

  return { RoomStock, money, headline, variantLabel, timer, el, fill, uuid, placeOrder };
})();
