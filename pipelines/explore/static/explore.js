// clipline explore: the search page. Text from the dataset is written with textContent only (never innerHTML),
// and a URL becomes a link only when it is http(s); the server's Content-Security-Policy forbids inline script.
"use strict";

const $ = (id) => document.getElementById(id);
let offset = 0;
let latest = 0; // the newest request: an older one answering late is dropped

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function httpUrl(url) {
  try {
    const u = new URL(url);
    return u.protocol === "http:" || u.protocol === "https:";
  } catch (e) {
    return false;
  }
}

function card(row) {
  const fig = el("figure", {class: "card " + (row.kept ? "kept" : "dropped"), "data-uid": row.uid,
                            "data-kept": String(row.kept), "data-reason": row.kept ? "" : (row.reason || "")});
  const link = el("a", {href: "/row/" + encodeURIComponent(row.uid)});
  if (row.thumb) link.appendChild(el("img", {src: "/thumb/" + encodeURIComponent(row.uid) + ".jpg", alt: ""}));
  else link.appendChild(el("div", {class: "noimg"}, row.status));
  fig.appendChild(link);
  const cap = el("figcaption");
  cap.appendChild(el("b", {class: "label"}, row.kept ? "kept" : row.reason));
  if (row.similarity !== undefined) cap.appendChild(el("span", {class: "sim"}, " similarity " + row.similarity.toFixed(3)));
  cap.appendChild(el("div", {class: "cap"}, row.caption || ""));
  if (row.url) {
    if (httpUrl(row.url)) {
      const a = el("a", {class: "url", rel: "noreferrer nofollow noopener", target: "_blank"}, row.url);
      a.href = row.url;
      cap.appendChild(a);
    } else {
      cap.appendChild(el("code", {class: "url"}, row.url));
    }
  }
  const scores = el("ul", {class: "scores"});
  for (const [k, v] of Object.entries(row.scores)) scores.appendChild(el("li", {"data-score": k}, k + " " + v));
  cap.appendChild(scores);
  fig.appendChild(cap);
  return fig;
}

function params() {
  const p = new URLSearchParams();
  for (const id of ["q", "status", "reason", "score", "low", "high", "k"]) {
    if ($(id).value !== "") p.set(id, $(id).value);
  }
  return p;
}

let shownParams = new URLSearchParams(); // what the grid shows: "more" pages it, whatever the form says now

async function search(append) {
  const p = append ? new URLSearchParams(shownParams) : params();
  if (append) p.set("offset", String(offset)); else { offset = 0; shownParams = p; }
  $("error").hidden = true;
  $("grid").dataset.loaded = "0";
  const mine = ++latest;
  const resp = await fetch("/api/search?" + p.toString());
  const body = await resp.json();
  if (mine !== latest) return;
  if (!resp.ok) {
    $("error").textContent = body.error;
    $("error").hidden = false;
    return;
  }
  if (!append) $("grid").replaceChildren();
  for (const row of body.rows) $("grid").appendChild(card(row));
  offset += body.rows.length;
  const shown = $("grid").children.length;
  $("summary").textContent = (body.query ? `nearest to "${body.query}": ` : "in ledger order: ") +
    `${shown} shown of ${body.matching} matching rows`;
  $("summary").dataset.matching = String(body.matching);
  $("summary").dataset.shown = String(shown);
  $("summary").dataset.query = body.query;
  $("more").hidden = body.query !== "" || offset >= body.matching;
  // every thumbnail decoded (or failed): what a screenshot or a test waits for
  await Promise.all([...$("grid").querySelectorAll("img")].map((i) => i.decode().catch(() => null)));
  if (mine !== latest) return;
  $("grid").dataset.loaded = "1";
  document.body.dataset.ready = "1";
}

async function start() {
  const info = await (await fetch("/api/info")).json();
  $("title").textContent = `${info.job} / ${info.stage}`;
  $("about").textContent = `version ${info.fingerprint.slice(0, 12)} (digest ${info.digest.slice(0, 12)}): ` +
    `${info.rows} rows, ${info.kept} kept, ${info.embedded} with an image embedding; queries embedded by ` +
    `${info.model}; clusters: ${info.clusters}`;
  for (const r of info.reasons) $("reason").appendChild(el("option", {value: r.reason}, `${r.reason} (${r.rows})`));
  for (const s of info.scores) $("score").appendChild(el("option", {value: s}, s));
  $("search").addEventListener("submit", (e) => { e.preventDefault(); search(false); });
  for (const id of ["status", "reason", "score"]) $(id).addEventListener("change", () => search(false));
  $("more").addEventListener("click", () => search(true));
  await search(false);
}

start();
