// clt's attribution-graph viewer: plain JavaScript, no dependencies, no network but its own server.
// Data come from `clt serve` (the /api/ routes of clt/viewer/server.py) or, in an exported file,
// from the JSON embedded in <script id="clt-data">. Layout: positions left to right, embeddings at
// the bottom, layers upwards, logits on top; edges coloured by sign, width by |w| relative to the
// target's strongest input.

const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const EMBED_EL = document.getElementById("clt-data");
const EMBED = EMBED_EL ? JSON.parse(EMBED_EL.textContent) : null;

// ---------------------------------------------------------------------------------------------
// Data access: the server, or the embedded export

class ApiError extends Error {}

async function getJSON(url, opts) {
  const r = await fetch(url, opts);
  let body = null;
  try { body = await r.json(); } catch (e) { body = null; }
  if (!r.ok) throw new ApiError((body && body.error) || `${r.status} ${r.statusText}`);
  return body;
}

function postJSON(url, obj) {
  return getJSON(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(obj) });
}

function q(params) { return new URLSearchParams(params).toString(); }

function decodeEdges(buf) {  // b"CLTE" | uint32 n | int32 src[n] | int32 dst[n] | float32 w[n]
  const dv = new DataView(buf);
  const magic = String.fromCharCode(dv.getUint8(0), dv.getUint8(1), dv.getUint8(2), dv.getUint8(3));
  if (magic !== "CLTE") throw new ApiError("the edge data is not in clt's binary format");
  const n = dv.getUint32(4, true);
  if (buf.byteLength !== 8 + 12 * n) throw new ApiError("the edge data is truncated");
  return { n, src: new Int32Array(buf, 8, n), dst: new Int32Array(buf, 8 + 4 * n, n),
           w: new Float32Array(buf, 8 + 8 * n, n) };
}

function b64ToBuffer(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out.buffer;
}

function cardMatches(card, text) {  // the server's /api/search rule, for exported files
  if (!card) return null;
  if ((card.top_logits || []).some((t) => t.trim().toLowerCase() === text || t.toLowerCase().includes(text))) return "top logit";
  for (const g of card.examples_quantiles || [])
    if (g.examples.some((ex) => ex.tokens.join("").toLowerCase().includes(text))) return "example text";
  return null;
}

const serverApi = {
  embedded: false,
  graphs: () => getJSON("/api/graphs"),
  view: (slug, nt, et) => getJSON(`/api/graph/${encodeURIComponent(slug)}?` + q({ node_threshold: nt, edge_threshold: et })),
  edges: async (slug, nt, et) => {
    const r = await fetch(`/api/edges/${encodeURIComponent(slug)}?` + q({ node_threshold: nt, edge_threshold: et }));
    if (!r.ok) { let m = `${r.status}`; try { m = (await r.json()).error; } catch (e) {} throw new ApiError(m); }
    return decodeEdges(await r.arrayBuffer());
  },
  card: (slug, node) => getJSON(`/api/card/${encodeURIComponent(slug)}?` + q({ node })),
  neighbors: (slug, node) => getJSON(`/api/neighbors/${encodeURIComponent(slug)}?` + q({ node, k: 8 })),
  search: (slug, text, nt, et) => getJSON(`/api/search/${encodeURIComponent(slug)}?` + q({ q: text, node_threshold: nt, edge_threshold: et })),
  paths: (slug, from, to, k, nt, et) => getJSON(`/api/paths/${encodeURIComponent(slug)}?` + q({ from, to, k, node_threshold: nt, edge_threshold: et })),
  state: (slug) => getJSON(`/api/state/${encodeURIComponent(slug)}`),
  saveState: (slug, s) => postJSON(`/api/state/${encodeURIComponent(slug)}`, s),
  scores: (slug, pinned) => postJSON(`/api/scores/${encodeURIComponent(slug)}`, { pinned }),
  attribute: (prompt) => postJSON("/api/attribute", { prompt }),
  job: (id) => getJSON(`/api/job/${encodeURIComponent(id)}`),
  intervene: (body) => postJSON("/api/intervene", body),
};

const embeddedApi = EMBED && {
  embedded: true,
  graphs: async () => ({ graphs: [{ slug: EMBED.view.slug, prompt: EMBED.view.prompt }] }),
  view: async () => EMBED.view,
  edges: async () => decodeEdges(b64ToBuffer(EMBED.edges)),
  card: async (slug, node) => EMBED.cards[node] || { card: null, prompt_acts: [], reason: "no card in this export" },
  neighbors: async (slug, node) => localNeighbours(node),
  search: async (slug, text) => ({
    matches: S.view.nodes.filter((n) => n.kind === "feature" && EMBED.cards[n.id] &&
                                        cardMatches(EMBED.cards[n.id].card, text))
                          .map((n) => ({ id: n.id, why: cardMatches(EMBED.cards[n.id].card, text) })) }),
  paths: async () => { throw new ApiError("paths need clt serve (this is a static export)"); },
  state: async () => EMBED.state,
  saveState: async () => ({ ok: true, readOnly: true }),
  scores: async () => null,
  attribute: async () => { throw new ApiError("attribution needs clt serve (this is a static export)"); },
  job: async () => null,
  intervene: async () => { throw new ApiError("interventions need clt serve (this is a static export)"); },
};

const api = EMBED ? embeddedApi : serverApi;

// ---------------------------------------------------------------------------------------------
// State

const S = {
  slug: "", view: null, edges: null, inAdj: null, outAdj: null,
  byId: new Map(), els: new Map(), pos: new Map(),
  pinned: [], supernodes: [], labels: { features: {}, nodes: {} }, clicked: "", hovered: "",
  selectedSg: new Set(), hits: [], hitAt: 0, lastQuery: "",
  tf: { x: 0, y: 0, k: 1 }, nt: 0.8, et: 0.98, loading: 0,
};

function message(text, kind = "error") {
  const m = $("message");
  if (!text) { m.hidden = true; m.textContent = ""; return; }
  m.hidden = false; m.className = kind; m.textContent = text;
}

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.setAttribute("class", v);
    else if (k === "style") e.setAttribute("style", v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v);
  }
  if (text !== undefined) e.textContent = text;
  return e;
}

const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const showTok = (t) => (t || "").replace(/\n/g, "⏎").replace(/\t/g, "→").replace(/\r/g, "↵");

function nodeLabel(n) {
  const user = S.labels.nodes[n.id] || (n.kind === "feature" ? S.labels.features[`${n.layer}/${n.feature}`] : "");
  if (user) return user;
  if (n.kind === "feature") return `L${n.layer}/#${n.feature} @${n.pos}`;
  if (n.kind === "error") return `Err L${n.layer} "${showTok(n.token)}"`;
  if (n.kind === "embedding") return `Emb "${showTok(n.token)}"`;
  return `Output "${showTok(n.token)}" (p=${fmt(n.prob)})`;
}

// ---------------------------------------------------------------------------------------------
// URL and sidecar state

function readUrl() {
  const p = new URLSearchParams(location.search);
  const out = {};
  if (p.has("slug")) out.slug = p.get("slug");
  if (p.has("pinned")) out.pinned = p.get("pinned").split(",").filter(Boolean);
  if (p.has("supernodes")) { try { out.supernodes = JSON.parse(p.get("supernodes")); } catch (e) { /* ignored */ } }
  if (p.has("clicked")) out.clicked = p.get("clicked");
  if (p.has("nt")) out.nt = parseFloat(p.get("nt"));
  if (p.has("et")) out.et = parseFloat(p.get("et"));
  return out;
}

function writeUrl() {
  if (EMBED) return;
  const p = new URLSearchParams();
  p.set("slug", S.slug);
  if (S.pinned.length) p.set("pinned", S.pinned.join(","));
  if (S.supernodes.length) p.set("supernodes", JSON.stringify(S.supernodes));
  if (S.clicked) p.set("clicked", S.clicked);
  p.set("nt", S.nt); p.set("et", S.et);
  history.replaceState(null, "", "?" + p.toString());
}

function stateObject() {
  return { format: "clt-viewer-state", version: 1, slug: S.slug, pinned: S.pinned, supernodes: S.supernodes,
           labels: S.labels, clicked: S.clicked, node_threshold: S.nt, edge_threshold: S.et, positions: {} };
}

// Saves go one at a time (a later state never lands before an earlier one), and only the latest
// change may report "saved ✓" (an earlier save finishing late must not claim the newer state).
let saveTimer = null, saveChain = Promise.resolve(), saveSeq = 0;
function changed() {
  writeUrl();
  const seq = ++saveSeq;
  clearTimeout(saveTimer);
  $("save-status").textContent = "saving…";
  saveTimer = setTimeout(() => { saveChain = saveChain.then(() => save(seq)); }, 250);
}

async function save(seq) {
  if (seq !== saveSeq) return;  // a newer change is queued and saves the newer state
  try {
    const r = await api.saveState(S.slug, stateObject());
    if (seq === saveSeq) $("save-status").textContent = r && r.readOnly ? "read-only export" : "saved ✓";
  } catch (e) {
    $("save-status").textContent = "not saved";
    message(`could not save the view state: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Loading a graph

async function loadGraphList(selectSlug) {
  const { graphs } = await api.graphs();
  const sel = $("graph-select");
  sel.replaceChildren(...graphs.map((g) => el("option", { value: g.slug }, `${g.slug} — ${g.prompt || ""}`)));
  if (!graphs.length) { message("this folder has no graphs yet: attribute a prompt below (or clt attribute … --out DIR)", "info"); return null; }
  const slug = graphs.some((g) => g.slug === selectSlug) ? selectSlug : graphs[graphs.length - 1].slug;
  sel.value = slug;
  return slug;
}

async function openGraph(slug, url = {}) {
  S.slug = slug;
  $("graph").dataset.ready = "0";
  let saved = null;
  try { saved = await api.state(slug); } catch (e) { message(`the saved view state cannot be read: ${e.message}`); }
  saved = saved || {};
  S.pinned = url.pinned || saved.pinned || [];
  S.supernodes = url.supernodes || saved.supernodes || [];
  S.labels = saved.labels || { features: {}, nodes: {} };
  S.labels.features = S.labels.features || {}; S.labels.nodes = S.labels.nodes || {};
  S.clicked = url.clicked !== undefined ? url.clicked : (saved.clicked || "");
  S.nt = url.nt || saved.node_threshold || (EMBED ? EMBED.view.node_threshold : 0.8);
  S.et = url.et || saved.edge_threshold || (EMBED ? EMBED.view.edge_threshold : 0.98);
  $("node-slider").value = S.nt; $("edge-slider").value = S.et;
  $("node-value").textContent = fmt(S.nt, 2); $("edge-value").textContent = fmt(S.et, 2);
  await loadView(true);
}

async function loadView(fit) {
  const ticket = ++S.loading;
  $("counts").textContent = "loading…";
  $("graph").dataset.ready = "0";
  let view, edges;
  try {
    [view, edges] = await Promise.all([api.view(S.slug, S.nt, S.et), api.edges(S.slug, S.nt, S.et)]);
  } catch (e) {
    if (ticket !== S.loading) return;
    $("counts").textContent = "";
    message(`cannot show graph ${S.slug}: ${e.message}`);
    $("nodes").replaceChildren(); $("edges").replaceChildren(); $("axes").replaceChildren();
    $("graph").dataset.ready = "error";
    return;
  }
  if (ticket !== S.loading) return;
  message("");
  S.view = view; S.edges = edges;
  S.byId = new Map(view.nodes.map((n, i) => [n.id, i]));
  buildAdjacency();
  // the state may name nodes that this pruning dropped: keep them (they come back with the slider)
  render(fit);
  $("prompt").textContent = view.prompt;
  $("prompt").title = view.prompt;
  $("counts").textContent = `${view.nodes.length} nodes · ${edges.n} edges (of ${view.n_nodes_full} nodes)`;
  const s = view.scores;
  $("scores").textContent = `view: replacement ${fmt(s["pruned/replacement_score"], 2)} · completeness ${fmt(s["pruned/completeness_score"], 2)}`
    + ` (full ${fmt(s["full/replacement_score"], 2)} / ${fmt(s["full/completeness_score"], 2)})`;
  $("node-slider").disabled = $("edge-slider").disabled = api.embedded;
  fillPathSelects();
  renderSubgraph();
  renderInterventionTable();
  if (S.clicked && S.byId.has(S.clicked)) showCard(S.clicked);
  writeUrl();
  window.cltViewer.readyAt = performance.now();  // first paint of this view (benchmarks/viewer.py)
  $("graph").dataset.ready = "1";
  $("graph").dataset.nodes = String(view.nodes.length);
  $("graph").dataset.edges = String(edges.n);
}

function buildAdjacency() {  // CSR in both directions over the view's edges
  const n = S.view.nodes.length, E = S.edges;
  const build = (key) => {
    const start = new Int32Array(n + 1);
    for (let e = 0; e < E.n; e++) start[E[key][e] + 1]++;
    for (let i = 0; i < n; i++) start[i + 1] += start[i];
    const fill = start.slice(0, n), list = new Int32Array(E.n);
    for (let e = 0; e < E.n; e++) list[fill[E[key][e]]++] = e;
    return { start, list };
  };
  S.inAdj = build("dst"); S.outAdj = build("src");
  S.maxIn = new Float32Array(n);
  for (let e = 0; e < E.n; e++) S.maxIn[E.dst[e]] = Math.max(S.maxIn[E.dst[e]], Math.abs(E.w[e]));
}

function edgesOf(i, adj) {
  const out = [];
  for (let j = adj.start[i]; j < adj.start[i + 1]; j++) out.push(adj.list[j]);
  return out;
}

function localNeighbours(nodeId) {  // exported files: strongest edges of the view
  const i = S.byId.get(nodeId);
  const pick = (adj, other) => edgesOf(i, adj).sort((a, b) => Math.abs(S.edges.w[b]) - Math.abs(S.edges.w[a])).slice(0, 8)
    .map((e) => ({ id: S.view.nodes[S.edges[other][e]].id, weight: S.edges.w[e] }));
  return { id: nodeId, inputs: pick(S.inAdj, "src"), outputs: pick(S.outAdj, "dst") };
}

// ---------------------------------------------------------------------------------------------
// Layout and drawing

const SPACING = 13, MIN_COL = 46, LEFT = 56, BOTTOM = 48;

function layout() {  // graph coordinates sized to the pane (so that a fit is ~1:1 and text stays legible)
  const v = S.view, L = v.n_layers, T = v.tokens.length;
  const box = $("graph").getBoundingClientRect();
  const rowH = Math.max(14, Math.min(60, (Math.max(box.height, 300) - BOTTOM - 24) / (L + 2)));
  const row = (n) => (n.kind === "embedding" ? 0 : n.kind === "logit" ? L + 1 : n.layer + 1);
  const cells = new Map();
  v.nodes.forEach((n, i) => {
    const key = n.pos * 1000 + row(n);
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  });
  const width = new Array(T).fill(MIN_COL);
  for (const [key, list] of cells) width[Math.floor(key / 1000)] = Math.max(width[Math.floor(key / 1000)], list.length * SPACING + 12);
  const x0 = [];
  let acc = LEFT;
  const natural = width.reduce((a, b) => a + b, 0), room = Math.max(box.width, 400) - LEFT - 20;
  if (natural < room) for (let t = 0; t < T; t++) width[t] *= room / natural;  // spread out a narrow graph
  for (let t = 0; t < T; t++) { x0.push(acc); acc += width[t]; }
  const H = (L + 2) * rowH;
  const pos = new Map();
  for (const [key, list] of cells) {
    const t = Math.floor(key / 1000), r = key % 1000;
    list.sort((a, b) => (v.nodes[a].influence ?? 1) - (v.nodes[b].influence ?? 1));
    const step = Math.min(SPACING, (width[t] - 12) / Math.max(list.length, 1));
    const start = x0[t] + width[t] / 2 - (step * (list.length - 1)) / 2;
    list.forEach((i, j) => pos.set(i, [start + j * step, H - (r + 0.5) * rowH]));
  }
  return { pos, x0, width, W: acc + 10, H: H + BOTTOM, L, T, rowH };
}

function drawAxes(lay) {
  const g = $("axes");
  const parts = [];
  const H = lay.H - BOTTOM;
  for (let r = 0; r <= lay.L + 1; r++) {
    const y = H - (r + 0.5) * lay.rowH;
    const name = r === 0 ? "Emb" : r === lay.L + 1 ? "Lgt" : `L${r - 1}`;
    parts.push(el("svg:line", { x1: LEFT - 6, x2: lay.W, y1: y, y2: y }));
    parts.push(el("svg:text", { x: 6, y: y + 4 }, name));
  }
  S.view.tokens.forEach((tok, t) => {
    const x = lay.x0[t] + lay.width[t] / 2;
    parts.push(el("svg:text", { class: "tok", x, y: H + 16, "text-anchor": "middle", "data-pos": t }, showTok(tok).slice(0, 12)));
    parts.push(el("svg:text", { x, y: H + 30, "text-anchor": "middle" }, String(t)));
  });
  const axis = el("svg:g", { class: "axis" });
  axis.replaceChildren(...parts);
  g.replaceChildren(axis);
}

function glyph(n, [x, y]) {
  const size = n.kind === "feature" ? 3.5 + 2 * (1 - Math.min(n.influence ?? 1, 1)) : 5;
  let e;
  if (n.kind === "feature") e = el("svg:circle", { cx: x, cy: y, r: size });
  else if (n.kind === "error") e = el("svg:rect", { x: x - 4, y: y - 4, width: 8, height: 8, transform: `rotate(45 ${x} ${y})` });
  else e = el("svg:rect", { x: x - 5, y: y - 5, width: 10, height: 10 });
  e.setAttribute("class", `node ${n.kind}`);
  e.dataset.nodeId = n.id;
  return e;
}

function render(fit) {
  const lay = layout();
  S.pos = lay.pos; S.lay = lay;
  drawAxes(lay);
  const frag = document.createDocumentFragment();
  S.els = new Map();
  S.view.nodes.forEach((n, i) => {
    const e = glyph(n, lay.pos.get(i));
    S.els.set(n.id, e);
    frag.appendChild(e);
  });
  $("nodes").replaceChildren(frag);
  if (fit) fitView();
  applyClasses();
  drawEdges();
}

function fitView() {
  const box = $("graph").getBoundingClientRect();
  const k = Math.min(box.width / S.lay.W, box.height / S.lay.H, 2.5);
  S.tf = { k, x: (box.width - S.lay.W * k) / 2, y: (box.height - S.lay.H * k) / 2 };
  applyTransform();
}

function applyTransform() {
  $("viewport").setAttribute("transform", `translate(${S.tf.x} ${S.tf.y}) scale(${S.tf.k})`);
}

function centerOn(id) {
  const i = S.byId.get(id);
  if (i === undefined) return;
  const [x, y] = S.pos.get(i);
  const box = $("graph").getBoundingClientRect();
  S.tf.k = Math.max(S.tf.k, 1.5);
  S.tf.x = box.width / 2 - x * S.tf.k;
  S.tf.y = box.height / 2 - y * S.tf.k;
  applyTransform();
}

const ALL_EDGES_MAX = 2500;

function drawEdges() {
  const E = S.edges, n = E.n;
  const focus = new Set([S.hovered, S.clicked, ...S.pinned].filter((id) => S.byId.has(id)).map((id) => S.byId.get(id)));
  let list = [];
  if (n <= ALL_EDGES_MAX) for (let e = 0; e < n; e++) list.push(e);
  else for (const i of focus) list.push(...edgesOf(i, S.inAdj), ...edgesOf(i, S.outAdj));
  const frag = document.createDocumentFragment();
  const strong = new Set();  // edges of the hovered or clicked node: drawn strongest; the pinned ones' fainter
  for (const id of [S.hovered, S.clicked]) {
    const i = S.byId.get(id);
    if (i === undefined) continue;
    for (const e of edgesOf(i, S.inAdj)) strong.add(e);
    for (const e of edgesOf(i, S.outAdj)) strong.add(e);
  }
  for (const e of list) {
    const [x1, y1] = S.pos.get(E.src[e]), [x2, y2] = S.pos.get(E.dst[e]);
    const rel = Math.abs(E.w[e]) / (S.maxIn[E.dst[e]] || 1);
    const hot = strong.has(e);
    const opacity = focus.size && !hot ? 0.08 : 0.25 + 0.6 * rel;
    frag.appendChild(el("svg:path", {
      class: "edge", d: `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2},${(y1 + y2) / 2} ${x2},${y2}`,
      stroke: E.w[e] >= 0 ? "var(--pos)" : "var(--neg)", "stroke-width": (0.3 + 2.7 * Math.sqrt(rel)).toFixed(2),
      "stroke-opacity": opacity.toFixed(2) }));
  }
  $("edges").replaceChildren(frag);
}

function applyClasses() {
  const hov = S.hovered && S.byId.has(S.hovered) ? S.view.nodes[S.byId.get(S.hovered)] : null;
  const pinned = new Set(S.pinned), hits = new Set(S.hits);
  for (const [id, e] of S.els) {
    const n = S.view.nodes[S.byId.get(id)];
    const same = hov && hov.kind === "feature" && n.kind === "feature" && n.layer === hov.layer && n.feature === hov.feature;
    e.classList.toggle("same-feature", !!same);
    e.classList.toggle("pinned", pinned.has(id));
    e.classList.toggle("hovered", id === S.hovered);
    e.classList.toggle("clicked", id === S.clicked);
    e.classList.toggle("search-hit", hits.has(id));
  }
}

// hover: the same feature is highlighted at every position where it is in the view
function hover(id) {
  if (id === S.hovered) return;
  const old = S.hovered;
  S.hovered = id;
  const prev = old && S.byId.has(old) ? S.view.nodes[S.byId.get(old)] : null;
  const cur = id ? S.view.nodes[S.byId.get(id)] : null;
  const key = (n) => (n && n.kind === "feature" ? `${n.layer}/${n.feature}` : null);
  for (const n of [prev, cur]) {
    if (!n) continue;
    if (key(n)) {
      for (const m of S.view.nodes) if (key(m) === key(n)) S.els.get(m.id).classList.toggle("same-feature", n === cur);
    }
    S.els.get(n.id).classList.toggle("hovered", n === cur);
  }
  const tip = $("tooltip");
  if (cur) {
    const e = S.els.get(cur.id).getBoundingClientRect(), box = $("graph-pane").getBoundingClientRect();
    tip.hidden = false;
    tip.textContent = `${nodeLabel(cur)}${cur.activation != null ? " · act " + fmt(cur.activation, 2) : ""}`;
    tip.style.left = `${e.left - box.left + 12}px`;
    tip.style.top = `${e.top - box.top - 24}px`;
  } else tip.hidden = true;
  if (S.edges.n > ALL_EDGES_MAX || S.clicked === "") scheduleEdges();
  if (cur) scheduleCard(cur.id); else if (S.clicked) scheduleCard(S.clicked);
}

let edgeFrame = 0;
function scheduleEdges() {
  cancelAnimationFrame(edgeFrame);
  edgeFrame = requestAnimationFrame(drawEdges);
}

let cardTimer = null;
// The card follows the hover, but never re-draws the card already shown, nor replaces a card whose
// label is being typed (that would drop the typing).
function scheduleCard(id) {
  clearTimeout(cardTimer);
  const wanted = () => id !== cardShown && document.activeElement?.id !== "label-input";
  if (wanted()) cardTimer = setTimeout(() => { if (wanted()) showCard(id); }, 60);
}

function togglePin(id) {
  if (S.pinned.includes(id)) {
    S.pinned = S.pinned.filter((x) => x !== id);
    S.supernodes = S.supernodes.map((sn) => ({ ...sn, members: sn.members.filter((m) => m !== id) }))
                               .filter((sn) => sn.members.length >= 2);
  } else S.pinned = [...S.pinned, id];
  applyClasses(); drawEdges(); renderSubgraph(); renderInterventionTable(); changed();
  if (S.clicked === id) showCard(id);
}

function select(id) {
  clearTimeout(cardTimer);  // a click supersedes the card a hover had scheduled
  S.clicked = id;
  applyClasses(); drawEdges();
  if (id) showCard(id);
  changed();
}

// ---------------------------------------------------------------------------------------------
// The card

const cardCache = new Map();
let cardShown = "";

function orange(a, max) {
  const t = Math.max(0, Math.min(1, max > 0 ? a / max : 0));
  if (t === 0) return "transparent";
  return `rgba(244, 121, 32, ${(0.12 + 0.78 * t).toFixed(3)})`;
}

function histogramSvg(card, act) {
  const h = card.histogram || [], W = 380, H = 90, n = h.length || 1, max = Math.max(1, ...h);
  const svg = el("svg:svg", { class: "hist", width: W, height: H + 16, viewBox: `0 0 ${W} ${H + 16}` });
  h.forEach((c, i) => {
    const bh = (H * c) / max;
    svg.appendChild(el("svg:rect", { class: "bar", x: (i * W) / n, y: H - bh, width: Math.max(W / n - 1, 1), height: bh }));
  });
  if (act != null && card.act_max > 0) {
    const x = Math.min(1, act / card.act_max) * W;
    svg.appendChild(el("svg:line", { class: "current", x1: x, x2: x, y1: 0, y2: H }));
    svg.appendChild(el("svg:text", { x: Math.min(x + 3, W - 60), y: 10 }, `this: ${fmt(act, 2)}`));
  }
  svg.appendChild(el("svg:text", { x: 0, y: H + 13 }, "0"));
  svg.appendChild(el("svg:text", { x: W - 40, y: H + 13 }, fmt(card.act_max, 2)));
  return svg;
}

function percentile(card, a) {
  const qv = card.quantile_values || [];
  for (let i = 0; i < qv.length; i++) if (a <= qv[i]) return i + 1;
  return 100;
}

function exampleDiv(ex, max) {
  const d = el("div", { class: "example" + (ex.is_repeated_datapoint ? " repeated" : "") });
  ex.tokens.forEach((t, i) => {
    const s = el("span", { class: "tok" + (i === ex.train_token_ind ? " peak" : ""), title: fmt(ex.tokens_acts_list[i], 3),
                           style: `background:${orange(ex.tokens_acts_list[i], max)}` }, showTok(t));
    d.appendChild(s);
  });
  return d;
}

function neighbourList(items, title) {
  const box = el("div");
  box.appendChild(el("h3", {}, title));
  if (!items.length) box.appendChild(el("div", { class: "muted" }, "none"));
  for (const it of items) {
    const i = S.byId.get(it.id);
    const n = i !== undefined ? S.view.nodes[i] : null;
    const row = el("span", { class: "nb", dataset: { nodeId: it.id }, onclick: () => { if (n) { select(it.id); centerOn(it.id); } } });
    row.appendChild(el("span", { class: "w " + (it.weight >= 0 ? "pos" : "neg") }, (it.weight >= 0 ? "+" : "") + fmt(it.weight, 3) + " "));
    row.appendChild(document.createTextNode(n ? nodeLabel(n) : it.id + " (pruned)"));
    box.appendChild(row);
  }
  return box;
}

function attentionSection(att) {  // graphs made with --attention: head loadings and QK attribution
  const box = el("div", { id: "card-attention" });
  box.appendChild(el("h3", {}, "Cross-position inputs: the heads that carry them"));
  box.appendChild(el("div", { class: "muted" }, "edge weight, source: each head's share of the edge. Within a layer, its heads' shares and the part that bypasses that layer's attention make 100% (heads of opposite sign cancel)"));
  if (!att.inputs.length) box.appendChild(el("div", { class: "muted" }, "no cross-position inputs in the pruned graph"));
  for (const it of att.inputs) {
    const i = S.byId.get(it.id);
    const name = i !== undefined ? nodeLabel(S.view.nodes[i]) : it.id;
    const heads = it.heads.map((h) => `L${h.layer}.H${h.head} ${(100 * h.share).toFixed(0)}%`).join(" · ") || "bypass only";
    box.appendChild(el("div", { class: "nb" }, `${fmt(it.weight, 3)} ${name}: ${heads}`));
  }
  for (const r of att.qk) {
    box.appendChild(el("h3", {}, `Why L${r.layer}.H${r.head} attends @${r.query} → @${r.key} (score ${fmt(r.score, 3)}, attention ${fmt(r.attention, 3)})`));
    const t = el("table", { class: "qk" });
    const hr = el("tr");
    hr.append(el("th", {}, "query side"), el("th", {}, "key side"), el("th", {}, "score part"));
    t.appendChild(hr);
    for (const [u, v, w] of r.pairs.slice(0, 6)) {
      const row = el("tr");
      row.append(el("td", {}, u), el("td", {}, v), el("td", { class: w >= 0 ? "pos" : "neg" }, fmt(w, 3)));
      t.appendChild(row);
    }
    box.appendChild(t);
  }
  return box;
}

async function showCard(id) {
  const i = S.byId.get(id);
  if (i === undefined) return;
  const n = S.view.nodes[i];
  cardShown = id;
  const box = $("card");
  const head = el("div");
  head.appendChild(el("h2", { id: "card-title" }, n.kind === "feature" ? `L${n.layer} #${n.feature} @${n.pos} "${showTok(n.token)}"` : nodeLabel(n)));
  const pinBtn = el("button", { id: "pin-btn", onclick: () => togglePin(id) }, S.pinned.includes(id) ? "Unpin" : "Pin");
  head.appendChild(pinBtn);
  const labelKey = n.kind === "feature" ? `${n.layer}/${n.feature}` : null;
  const current = labelKey ? S.labels.features[labelKey] || "" : S.labels.nodes[id] || "";
  const input = el("input", { id: "label-input", dataset: { nodeId: id },
                              placeholder: n.kind === "feature" ? "label this feature" : "label this node", size: 24 });
  input.value = current;
  input.addEventListener("change", () => {
    const v = input.value.trim();
    const table = labelKey ? S.labels.features : S.labels.nodes;
    const k = labelKey || id;
    if (v) table[k] = v; else delete table[k];
    renderSubgraph(); changed();
  });
  head.appendChild(el("span", {}, " "));
  head.appendChild(input);
  const body = el("div", { id: "card-body" });
  box.replaceChildren(head, body);
  const key = `${S.slug}|${id}`;
  const fetches = [cardCache.get(key + "|nb") || api.neighbors(S.slug, id)];
  if (n.kind === "feature") fetches.push(cardCache.get(key) || api.card(S.slug, id));
  let nb, data;
  try {
    [nb, data] = await Promise.all(fetches);
  } catch (e) {
    if (cardShown === id) body.replaceChildren(el("div", { class: "muted" }, `cannot load: ${e.message}`));
    return;
  }
  cardCache.set(key + "|nb", nb);
  if (data) cardCache.set(key, data);
  if (cardShown !== id) return;
  const parts = [];
  if (n.kind === "feature") {
    const card = data.card;
    const line = [`Act: ${fmt(n.activation, 3)}`];
    if (card) line.push(`${percentile(card, n.activation)}th pct`, `freq ${(100 * card.activation_frequency).toFixed(3)}%`,
                        `max ${fmt(card.act_max, 2)}`, `${card.n_tokens.toLocaleString()} tokens scanned`);
    parts.push(el("div", { id: "card-act" }, line.join(" · ")));
    // the feature on every prompt token
    const strip = el("div", { class: "strip", title: "this feature's activation on every prompt token" });
    const pa = data.prompt_acts || [], pmax = Math.max(1e-9, ...pa);
    S.view.tokens.forEach((t, p) => strip.appendChild(el("span", { class: "tok" + (p === n.pos ? " here" : ""), title: fmt(pa[p] || 0, 3),
                                                                    style: `background:${orange(pa[p] || 0, pmax)}` }, showTok(t))));
    parts.push(el("h3", {}, "On this prompt"), strip);
    if (!card) parts.push(el("div", { id: "card-missing", class: "muted" }, data.reason || "no card"));
    else {
      parts.push(el("h3", {}, "Activations (non-zero)"), histogramSvg(card, n.activation));
      const chips = (names, vals, cls) => {
        const c = el("div", { class: "chips" });
        names.forEach((t, j) => { const s = el("span", { class: `logit-chip ${cls}` }, showTok(t)); s.appendChild(el("small", {}, fmt(vals[j], 2))); c.appendChild(s); });
        return c;
      };
      parts.push(el("h3", {}, "Top logits"), chips(card.top_logits, card.top_logit_values, "top"));
      parts.push(el("h3", {}, "Bottom logits"), chips(card.bottom_logits, card.bottom_logit_values, "bottom"));
      const norms = card.decoder_norms || [], nmax = Math.max(1e-9, ...norms);
      const ns = el("svg:svg", { class: "norms", width: 380, height: 40 });
      norms.forEach((v, j) => {
        const w = 380 / Math.max(norms.length, 1), h = 26 * v / nmax;
        ns.appendChild(el("svg:rect", { class: "bar", x: j * w, y: 28 - h, width: w - 2, height: h }));
        ns.appendChild(el("svg:text", { x: j * w, y: 38 }, `L${card.layer + j}`));
      });
      parts.push(el("h3", {}, "Writes to (decoder norm per layer)"), ns);
      const vw = (list) => list.slice(0, 5).map((x) => `L${x.layer}/#${x.feature} ${fmt(x.weight, 2)}`).join(" · ") || "none";
      parts.push(el("h3", {}, "Virtual-weight neighbours"), el("div", {}, "down: " + vw(card.downstream)), el("div", {}, "up: " + vw(card.upstream)));
    }
  } else if (n.kind === "logit") parts.push(el("div", {}, `p = ${fmt(n.prob, 4)}`));
  const cols = el("div", { class: "cols" });
  cols.append(neighbourList(nb.inputs, "Inputs in this graph"), neighbourList(nb.outputs, "Outputs in this graph"));
  parts.push(cols);
  if (nb.attention) parts.push(attentionSection(nb.attention));
  if (n.kind === "feature" && data.card) {
    for (const g of data.card.examples_quantiles) {
      const sec = el("div", { class: "group" });
      sec.appendChild(el("h3", {}, g.quantile_name));
      if (!g.examples.length) sec.appendChild(el("div", { class: "muted" }, "no examples"));
      g.examples.forEach((ex) => sec.appendChild(exampleDiv(ex, data.card.act_max)));
      parts.push(sec);
    }
  }
  body.replaceChildren(...parts);
}

// ---------------------------------------------------------------------------------------------
// Subgraph: pinned nodes, supernodes, labels; its scores

function renderSubgraph() {
  const svg = $("subgraph");
  const box = svg.getBoundingClientRect();
  const W = Math.max(box.width, 200), H = Math.max(box.height, 80);
  const inSn = new Map();
  S.supernodes.forEach((sn, j) => sn.members.forEach((m) => inSn.set(m, j)));
  const items = [];  // one box per supernode, one per other pinned node
  S.supernodes.forEach((sn, j) => items.push({ key: `sn${j}`, label: sn.label, members: sn.members, sn: j }));
  for (const id of S.pinned) if (!inSn.has(id)) items.push({ key: id, label: null, members: [id] });
  const info = (id) => { const i = S.byId.get(id); return i === undefined ? null : S.view.nodes[i]; };
  const L = S.view.n_layers;
  const rowOf = (n) => (!n ? 0 : n.kind === "embedding" ? 0 : n.kind === "logit" ? L + 1 : n.layer + 1);
  const T = S.view.tokens.length;
  items.forEach((it) => {
    const ns = it.members.map(info).filter(Boolean);
    it.row = ns.length ? ns.reduce((a, n) => a + rowOf(n), 0) / ns.length : 0;
    it.col = ns.length ? ns.reduce((a, n) => a + n.pos, 0) / ns.length : 0;
    if (it.label === null) it.label = ns.length ? nodeLabel(ns[0]) : `${it.key} (pruned)`;
  });
  // layered: one row per layer (embeddings at the bottom), boxes ordered by position, never overlapping
  const parts = [];
  const xy = new Map();
  const rows = new Map();
  items.forEach((it) => {
    const text = it.label.length > 22 ? it.label.slice(0, 21) + "…" : it.label;
    it.text = text; it.w = 8 + 6.2 * text.length;
    const r = Math.round(it.row);
    if (!rows.has(r)) rows.set(r, []);
    rows.get(r).push(it);
  });
  const levels = [...rows.keys()].sort((a, b) => a - b);
  for (const [r, list] of rows) {
    const level = levels.indexOf(r);
    list.sort((a, b) => a.col - b.col);
    let right = 4;
    for (const it of list) {
      const want = 60 + ((W - 140) * it.col) / Math.max(T - 1, 1);
      const x = Math.max(want, right + it.w / 2 + 6);
      right = x + it.w / 2;
      xy.set(it.key, [x, H - 18 - ((H - 36) * level) / Math.max(levels.length - 1, 1)]);
    }
  }
  // edges between boxes (view edges, summed over supernode members)
  const keyOf = new Map();
  items.forEach((it) => it.members.forEach((m) => keyOf.set(m, it.key)));
  const sums = new Map();
  for (const it of items) for (const m of it.members) {
    const i = S.byId.get(m);
    if (i === undefined) continue;
    for (const e of edgesOf(i, S.outAdj)) {
      const t = keyOf.get(S.view.nodes[S.edges.dst[e]].id);
      if (!t || t === it.key) continue;
      const k = `${it.key}>${t}`;
      sums.set(k, (sums.get(k) || 0) + S.edges.w[e]);
    }
  }
  const smax = Math.max(1e-9, ...[...sums.values()].map(Math.abs));
  for (const [k, w] of sums) {
    const [a, b] = k.split(">");
    const [x1, y1] = xy.get(a), [x2, y2] = xy.get(b);
    parts.push(el("svg:line", { x1, y1, x2, y2, stroke: w >= 0 ? "var(--pos)" : "var(--neg)",
                                "stroke-width": (0.5 + 3 * Math.abs(w) / smax).toFixed(2), "stroke-opacity": 0.7 }));
  }
  for (const it of items) {
    const [x, y] = xy.get(it.key);
    const g = el("svg:g", { class: "sg-node" + (it.sn !== undefined ? " supernode" : "") + (S.selectedSg.has(it.key) ? " selected" : ""),
                            dataset: { key: it.key, members: it.members.join(",") } });
    const text = it.text, w = it.w;
    g.appendChild(el("svg:rect", { x: x - w / 2, y: y - 9, width: w, height: 18, rx: 4 }));
    g.appendChild(el("svg:text", { x, y: y + 4, "text-anchor": "middle" }, text));
    g.addEventListener("click", () => {
      if (S.selectedSg.has(it.key)) S.selectedSg.delete(it.key); else S.selectedSg.add(it.key);
      renderSubgraph();
      if (it.members.length === 1 && S.byId.has(it.members[0])) { S.clicked = it.members[0]; applyClasses(); showCard(it.members[0]); }
    });
    parts.push(g);
  }
  svg.replaceChildren(...parts);
  // supernode labels, editable
  const list = $("supernode-list");
  list.replaceChildren(...S.supernodes.map((sn, j) => {
    const row = el("span", { class: "sn-row" });
    const inp = el("input", { class: "sn-label", size: 14, dataset: { index: j } });
    inp.value = sn.label;
    inp.addEventListener("change", () => { S.supernodes[j].label = inp.value.trim() || `supernode ${j + 1}`; renderSubgraph(); changed(); });
    row.append(el("span", { class: "muted" }, `${sn.members.length} nodes:`), inp);
    return row;
  }));
  updateSubScores();
}

let scoreTicket = 0;
async function updateSubScores() {
  const t = ++scoreTicket;
  if (!S.pinned.length) { $("sub-scores").textContent = "pin nodes (ctrl-click, or Pin on the card)"; return; }
  try {
    const s = await api.scores(S.slug, S.pinned);
    if (t !== scoreTicket || !s) return;
    $("sub-scores").textContent = `${S.pinned.length} pinned · ${s.n_features} features: replacement ${fmt(s.replacement_score, 2)} · completeness ${fmt(s.completeness_score, 2)}`;
  } catch (e) {
    if (t === scoreTicket) $("sub-scores").textContent = `scores: ${e.message}`;
  }
}

function groupSelected() {
  const members = [];
  for (const key of S.selectedSg) {
    if (key.startsWith("sn")) continue;
    members.push(key);
  }
  if (members.length < 2) { message("select at least two pinned nodes (click them in the subgraph) to group them", "info"); return; }
  const label = $("sn-label").value.trim() || `supernode ${S.supernodes.length + 1}`;
  S.supernodes = [...S.supernodes, { label, members }];
  S.selectedSg.clear();
  $("sn-label").value = "";
  message("");
  renderSubgraph(); changed();
}

function ungroupSelected() {
  const drop = new Set([...S.selectedSg].filter((k) => k.startsWith("sn")).map((k) => +k.slice(2)));
  S.supernodes = S.supernodes.filter((_, j) => !drop.has(j));
  S.selectedSg.clear();
  renderSubgraph(); changed();
}

// ---------------------------------------------------------------------------------------------
// Search and paths

function parseFeatureQuery(text) {
  const m = text.match(/^l?\s*(\d+)\s*[/#_:]\s*#?\s*(\d+)$/i);
  return m ? [parseInt(m[1]), parseInt(m[2])] : null;
}

async function search(text) {
  text = text.trim();
  if (!text) { S.hits = []; applyClasses(); $("search-status").textContent = ""; return; }
  if (text === S.lastQuery && S.hits.length) { S.hitAt = (S.hitAt + 1) % S.hits.length; focusHit(); return; }
  S.lastQuery = text;
  const lower = text.toLowerCase();
  const lf = parseFeatureQuery(text);
  const byInfluence = (a, b) => (S.view.nodes[S.byId.get(a)].influence ?? 1) - (S.view.nodes[S.byId.get(b)].influence ?? 1);
  let hits = [];
  if (lf) hits = S.view.nodes.filter((n) => n.kind === "feature" && n.layer === lf[0] && n.feature === lf[1]).map((n) => n.id);
  else {
    hits = S.view.nodes.filter((n) => nodeLabel(n).toLowerCase().includes(lower) ||
                                      ((n.kind === "logit" || n.kind === "embedding") && n.token.trim().toLowerCase() === lower)).map((n) => n.id);
    try {
      const r = await api.search(S.slug, lower, S.nt, S.et);
      for (const m of r.matches) if (!hits.includes(m.id)) hits.push(m.id);
    } catch (e) { message(`search: ${e.message}`); }
  }
  hits.sort(byInfluence);
  S.hits = hits; S.hitAt = 0;
  $("search-status").textContent = hits.length ? `${hits.length} match${hits.length > 1 ? "es" : ""} (Enter: next)` : "no match";
  applyClasses();
  if (hits.length) focusHit();
}

function focusHit() {
  const id = S.hits[S.hitAt];
  $("search-status").textContent = `${S.hitAt + 1} of ${S.hits.length} (Enter: next)`;
  select(id);
  centerOn(id);
}

function fillPathSelects() {
  const from = $("path-from"), to = $("path-to");
  const opts = (kind) => S.view.nodes.filter((n) => n.kind === kind).map((n) => el("option", { value: n.id }, nodeLabel(n)));
  from.replaceChildren(...opts("embedding"));
  to.replaceChildren(...opts("logit"));
  if (from.options.length > 1) from.selectedIndex = from.options.length - 1;
}

async function findPaths() {
  const list = $("paths");
  list.replaceChildren(el("li", { class: "muted" }, "searching…"));
  try {
    const r = await api.paths(S.slug, $("path-from").value, $("path-to").value, $("path-k").value, S.nt, S.et);
    if (!r.paths.length) { list.replaceChildren(el("li", { class: "muted" }, "no path in this view")); return; }
    list.replaceChildren(...r.paths.map((p) => {
      const li = el("li", { class: "path", dataset: { nodes: p.nodes.join(",") } });
      li.appendChild(el("span", {}, `${fmt(p.strength, 4)}: ` + p.nodes.map((id) => nodeLabel(S.view.nodes[S.byId.get(id)])).join(" → ") + " "));
      li.appendChild(el("button", { class: "pin-path", onclick: () => {
        for (const id of p.nodes) if (!S.pinned.includes(id)) S.pinned.push(id);
        S.pinned = [...S.pinned]; applyClasses(); drawEdges(); renderSubgraph(); renderInterventionTable(); changed();
      } }, "pin this path"));
      return li;
    }));
  } catch (e) { list.replaceChildren(el("li", { class: "muted" }, e.message)); }
}

// ---------------------------------------------------------------------------------------------
// Attribute a prompt, intervene

async function attributePrompt() {
  const prompt = $("prompt-input").value;
  const bar = $("attr-progress"), status = $("attr-status");
  status.textContent = "starting (the first run loads the model)…";
  $("attribute-btn").disabled = true;
  try {
    let job = await api.attribute(prompt);
    bar.hidden = false; bar.value = 0;
    while (job.state === "queued" || job.state === "running") {
      await new Promise((r) => setTimeout(r, 250));
      job = await api.job(job.id);
      if (job.total) { bar.max = job.total; bar.value = job.done; status.textContent = `${job.done}/${job.total} rows`; }
    }
    if (job.state === "error") throw new ApiError(job.error);
    status.textContent = `done in ${job.seconds} s: ${job.slug}`;
    const slug = await loadGraphList(job.slug);
    S.clicked = ""; S.hits = [];
    await openGraph(slug, {});
  } catch (e) {
    status.textContent = "failed";
    message(`attribution failed: ${e.message}`);
  } finally {
    bar.hidden = true;
    $("attribute-btn").disabled = false;
  }
}

function renderInterventionTable() {
  const rows = S.pinned.map((id) => S.byId.has(id) ? S.view.nodes[S.byId.get(id)] : null).filter((n) => n && n.kind === "feature");
  const t = $("iv-table");
  t.replaceChildren(...rows.map((n) => {
    const tr = el("tr", { dataset: { nodeId: n.id } });
    const on = el("input", { type: "checkbox", class: "iv-on" }); on.checked = true;
    const op = el("select", { class: "iv-op" }); op.append(el("option", { value: "scale" }, "scale ×"), el("option", { value: "set" }, "set ="));
    const val = el("input", { class: "iv-value", type: "number", step: "any", value: "0", style: "width:5em" });
    const cells = [on, document.createTextNode(nodeLabel(n) + ` (act ${fmt(n.activation, 2)})`), op, val];
    cells.forEach((c) => { const td = el("td"); td.appendChild(c); tr.appendChild(td); });
    return tr;
  }));
}

async function runIntervention() {
  const items = [];
  for (const tr of $("iv-table").querySelectorAll("tr")) {
    if (!tr.querySelector(".iv-on").checked) continue;
    items.push({ node: tr.dataset.nodeId, op: tr.querySelector(".iv-op").value, value: parseFloat(tr.querySelector(".iv-value").value || "0") });
  }
  const extra = $("iv-add").value.trim();
  if (extra) {
    const m = extra.match(/^l?(\d+)\s*\/\s*#?(\d+)\s*@\s*(\d+)(?:\s*=\s*(-?[\d.]+))?$/i);
    if (!m) { message(`"${extra}": write an added intervention as L/F@pos (optionally =value)`); return; }
    items.push({ layer: +m[1], feature: +m[2], position: +m[3], op: "set", value: m[4] ? parseFloat(m[4]) : 0 });
  }
  const out = $("iv-result");
  if (!items.length) { message("pin features (or add one as L/F@pos) to intervene on", "info"); return; }
  out.replaceChildren(el("div", { class: "muted" }, "running…"));
  try {
    const r = await api.intervene({ slug: S.slug, mode: $("iv-mode").value, interventions: items, max_new_tokens: 8 });
    message("");
    const table = el("table", { id: "iv-top" });
    table.appendChild(el("tr", {}, "")).append(el("th", {}, "before"), el("th", {}, "p"), el("th", {}, "after"), el("th", {}, "p"));
    for (let j = 0; j < r.after.length; j++) {
      const tr = el("tr", { class: "iv-row" });
      tr.append(el("td", {}, showTok(r.before[j].token)), el("td", {}, fmt(r.before[j].prob, 4)),
                el("td", { class: "iv-after-token", dataset: { id: r.after[j].id } }, showTok(r.after[j].token)),
                el("td", { class: "iv-after-prob" }, fmt(r.after[j].prob, 4)));
      table.appendChild(tr);
    }
    const ch = r.changed.slice(0, 5).map((c) => `${showTok(c.token)} ${fmt(c.before, 4)}→${fmt(c.after, 4)} `
      + `(Δlog p ${c.delta_logprob >= 0 ? "+" : ""}${fmt(c.delta_logprob, 2)})`).join(" · ");
    out.replaceChildren(el("div", {}, `${r.mode}, ${r.interventions.length} intervention(s). Biggest changes: ${ch}`), table,
                        el("div", {}, "continuation, clean: "), el("div", { class: "cont", id: "iv-base-cont" }, r.baseline_continuation),
                        el("div", {}, "with the intervention: "), el("div", { class: "cont", id: "iv-cont" }, r.continuation));
  } catch (e) {
    out.replaceChildren(el("div", { class: "muted" }, "failed"));
    message(`intervention failed: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Events

function wire() {
  const svg = $("graph");
  const nodes = $("nodes");
  nodes.addEventListener("mouseover", (ev) => { const id = ev.target.dataset && ev.target.dataset.nodeId; if (id) hover(id); });
  nodes.addEventListener("mouseout", (ev) => { if (ev.target.dataset && ev.target.dataset.nodeId) hover(""); });
  nodes.addEventListener("click", (ev) => {
    const id = ev.target.dataset && ev.target.dataset.nodeId;
    if (!id) return;
    ev.stopPropagation();
    if (ev.ctrlKey || ev.metaKey || ev.shiftKey) togglePin(id); else select(id);
  });
  let drag = null;
  svg.addEventListener("mousedown", (ev) => { if (!ev.target.dataset.nodeId) { drag = { x: ev.clientX, y: ev.clientY, tx: S.tf.x, ty: S.tf.y, moved: false }; svg.classList.add("dragging"); } });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    drag.moved = true;
    S.tf.x = drag.tx + ev.clientX - drag.x; S.tf.y = drag.ty + ev.clientY - drag.y;
    applyTransform();
  });
  window.addEventListener("mouseup", () => { drag = null; svg.classList.remove("dragging"); });
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const box = svg.getBoundingClientRect();
    const mx = ev.clientX - box.left, my = ev.clientY - box.top;
    const k = Math.max(0.05, Math.min(20, S.tf.k * Math.exp(-ev.deltaY * 0.0015)));
    S.tf.x = mx - ((mx - S.tf.x) * k) / S.tf.k; S.tf.y = my - ((my - S.tf.y) * k) / S.tf.k; S.tf.k = k;
    applyTransform();
  }, { passive: false });
  window.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") { S.clicked = ""; S.hits = []; applyClasses(); drawEdges(); changed(); }
  });
  let sliderTimer = null;
  for (const [id, key, out] of [["node-slider", "nt", "node-value"], ["edge-slider", "et", "edge-value"]]) {
    $(id).addEventListener("input", () => {
      S[key] = parseFloat($(id).value);
      $(out).textContent = fmt(S[key], 2);
      clearTimeout(sliderTimer);
      sliderTimer = setTimeout(async () => { await loadView(false); changed(); }, 200);
    });
  }
  $("graph-select").addEventListener("change", () => { S.clicked = ""; S.hits = []; openGraph($("graph-select").value, {}); });
  $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") search($("search").value); });
  $("group-btn").addEventListener("click", groupSelected);
  $("ungroup-btn").addEventListener("click", ungroupSelected);
  $("clear-pins").addEventListener("click", () => { S.pinned = []; S.supernodes = []; S.selectedSg.clear(); applyClasses(); drawEdges(); renderSubgraph(); renderInterventionTable(); changed(); });
  $("paths-btn").addEventListener("click", findPaths);
  $("attribute-btn").addEventListener("click", attributePrompt);
  $("prompt-input").addEventListener("keydown", (ev) => { if (ev.key === "Enter") attributePrompt(); });
  $("iv-run").addEventListener("click", runIntervention);
  window.addEventListener("resize", () => { if (S.view) { fitView(); renderSubgraph(); } });
  if (api.embedded) for (const id of ["attribute-btn", "iv-run", "paths-btn", "prompt-input"]) $(id).disabled = true;
}

async function main() {
  wire();
  const url = readUrl();
  try {
    const slug = await loadGraphList(url.slug || (EMBED && EMBED.view.slug));
    if (slug) await openGraph(slug, slug === url.slug ? url : {});
  } catch (e) {
    message(`cannot load the graphs: ${e.message}`);
    $("graph").dataset.ready = "error";
  }
}

window.cltViewer = { S, search, select, togglePin, centerOn, hover };
main();
