// AdaFace web console: plain browser JavaScript over the HTTP/JSON API (see /openapi.json).
// Paths are relative, so the console also works behind a proxy that mounts it under a prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { faces: [], gallery: "", identityToken: "" };

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = $("token").value.trim();
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body !== undefined && !(body instanceof FormData)) };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) {
    const e = data.error || {};
    throw new Error(`${e.code || response.status}: ${e.message || response.statusText}`);
  }
  return data;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, attrs || {});
  for (const child of children) node.append(child);
  return node;
}

// -- model and galleries -----------------------------------------------------------------

async function loadInfo() {
  try {
    const info = await api("GET", "v1/info");
    $("model").textContent = `${info.model_name} (${info.arch}, ${info.embedding_dim}-d, ${info.backend})`;
  } catch (err) {
    $("model").textContent = String(err.message);
  }
}

async function loadGalleries(select) {
  const data = await api("GET", "v1/galleries");
  const box = $("gallery");
  box.replaceChildren(el("option", { value: "", textContent: "(none)" }));
  for (const g of data.galleries) {
    box.append(el("option", { value: g.name, textContent: `${g.name} (${g.identity_count})` }));
  }
  box.value = select !== undefined ? select : state.gallery;
  state.gallery = box.value;
}

async function loadIdentities(more) {
  const list = $("identities");
  if (!more) {
    list.replaceChildren();
    state.identityToken = "";
  }
  $("more-identities").hidden = true;
  if (!state.gallery) {
    $("identity-count").textContent = "";
    return;
  }
  const g = encodeURIComponent(state.gallery);
  const query = `page_size=50&page_token=${encodeURIComponent(state.identityToken)}`;
  const data = await api("GET", `v1/galleries/${g}/identities?${query}`);
  for (const identity of data.identities) {
    list.append(el("li", { className: "identity", textContent: `${identity.identity} · ${identity.sample_count} sample(s)` }));
  }
  const info = await api("GET", `v1/galleries/${g}`);
  $("identity-count").textContent = `(${info.identity_count})`;
  state.identityToken = data.next_page_token;
  $("more-identities").hidden = !data.next_page_token;
}

// -- photo, faces, matches ---------------------------------------------------------------

async function detect(file) {
  state.faces = [];
  renderFaces();
  $("photo-img").src = URL.createObjectURL(file);
  await $("photo-img").decode().catch(() => {});
  status("detecting…");
  const form = new FormData();
  form.append("image", file, file.name || "photo");
  form.append("options.selection", "FACE_SELECTION_ALL");
  form.append("options.return_aligned", "true");
  try {
    const data = await api("POST", "v1/detect", form);
    const result = data.results[0];
    if (result.error) throw new Error(result.error.message);
    state.faces = result.faces;
    status(`${state.faces.length} face(s)`);
  } catch (err) {
    status(err.message, true);
  }
  renderFaces();
  await search();
}

function renderFaces() {
  const stage = $("stage");
  for (const box of stage.querySelectorAll(".face-box")) box.remove();
  const img = $("photo-img");
  const scale = img.naturalWidth ? img.clientWidth / img.naturalWidth : 1;
  const list = $("faces");
  list.replaceChildren();
  state.faces.forEach((face, i) => {
    const [x1, y1, x2, y2] = face.box;
    const box = el("div", { className: "face-box" }, el("span", { textContent: `#${i + 1} ${face.score.toFixed(3)}` }));
    Object.assign(box.style, {
      left: `${x1 * scale}px`, top: `${y1 * scale}px`,
      width: `${(x2 - x1) * scale}px`, height: `${(y2 - y1) * scale}px`,
    });
    stage.append(box);
    const name = el("input", { placeholder: "name", className: "enroll-name" });
    const button = el("button", { type: "submit", textContent: "Enroll" });
    const form = el("form", { className: "enroll" }, name, button);
    form.addEventListener("submit", (event) => { event.preventDefault(); enroll(i, name.value.trim()); });
    list.append(el("li", { className: "face" },
      el("img", { className: "crop", src: "data:image/png;base64," + face.aligned_png, alt: `face ${i + 1}` }),
      el("div", {},
        el("div", {}, `#${i + 1} score `, el("span", { className: "score", textContent: face.score.toFixed(3) })),
        el("ol", { className: "matches" }),
        form)));
  });
}

function probe(face) {
  return { image: { encoded: face.aligned_png, alignment: "ALIGNMENT_ALIGNED" } };
}

async function search() {
  const lists = document.querySelectorAll("#faces .matches");
  for (const ol of lists) ol.replaceChildren();
  if (!state.gallery || state.faces.length === 0) return;
  try {
    const data = await api("POST", `v1/galleries/${encodeURIComponent(state.gallery)}/search`,
      { probes: state.faces.map(probe), top_k: 5 });
    data.results.forEach((result, i) => {
      const ol = lists[i];
      if (result.error) ol.append(el("li", { className: "none", textContent: result.error.message }));
      else if (result.matches.length === 0) ol.append(el("li", { className: "none", textContent: "no matches" }));
      for (const m of result.matches) {
        ol.append(el("li", { className: "match" },
          el("span", { className: "match-name", textContent: m.identity }), " ",
          el("span", { className: "match-score", textContent: m.score.toFixed(3) })));
      }
    });
    document.body.dataset.searched = String(Number(document.body.dataset.searched || 0) + 1);
  } catch (err) {
    status(err.message, true);
  }
}

async function enroll(i, name) {
  if (!state.gallery) return status("pick or create a gallery first", true);
  if (!name) return status("give the face a name", true);
  try {
    const g = encodeURIComponent(state.gallery);
    const data = await api("POST", `v1/galleries/${g}/enroll`,
      { identity: name, samples: [probe(state.faces[i])], mode: "ENROLL_MODE_UPSERT" });
    status(`enrolled ${data.identity} (${data.sample_count} sample(s))`);
    await loadGalleries(state.gallery);
    await loadIdentities();
    await search();
  } catch (err) {
    status(err.message, true);
  }
}

// -- wiring ------------------------------------------------------------------------------

$("token").value = localStorage.getItem("adaface-token") || "";
$("token").addEventListener("change", () => {
  localStorage.setItem("adaface-token", $("token").value.trim());
  loadInfo();
  loadGalleries().then(() => loadIdentities()).catch((err) => status(err.message, true));
});
$("photo").addEventListener("change", (event) => {
  if (event.target.files.length) detect(event.target.files[0]);
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) detect(event.dataTransfer.files[0]);
});
$("gallery").addEventListener("change", async () => {
  state.gallery = $("gallery").value;
  await loadIdentities().catch((err) => status(err.message, true));
  await search();
});
$("new-gallery").addEventListener("submit", async (event) => {
  event.preventDefault();
  const name = $("new-gallery-name").value.trim();
  try {
    await api("POST", "v1/galleries", { name });
    $("new-gallery-name").value = "";
    await loadGalleries(name);
    await loadIdentities();
    await search();
    status(`created gallery ${name}`);
  } catch (err) {
    status(err.message, true);
  }
});
$("more-identities").addEventListener("click", () => loadIdentities(true).catch((err) => status(err.message, true)));
loadInfo();
loadGalleries().then(() => loadIdentities()).catch((err) => status(err.message, true));
