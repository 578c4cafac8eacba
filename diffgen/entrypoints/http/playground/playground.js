"use strict";
// The diffgen playground. It speaks only the server's public HTTP API (the one every client uses), with the
// API key when one is given. Progress arrives as Server-Sent Events read through fetch, because EventSource
// can neither POST nor send an Authorization header.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "diffgen-api-key";
const page = { model: null, images: [] }; // images: this page's image results, newest first

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE) || "";
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers || {}) });
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body.error) message = body.error.message;
    } catch (ignored) { /* not JSON: keep the status */ }
    throw new Error(message);
  }
  return response;
}

// Yields {event, data} for each Server-Sent Event of a fetch response (comments and blank data skipped).
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// -- the model ---------------------------------------------------------------------------------------------
async function loadModel() {
  let model;
  try {
    model = (await (await api("/v1/models")).json()).data[0];
  } catch (error) {
    $("model-info").textContent = `cannot read the model: ${error.message}`;
    setTimeout(loadModel, 2000);
    return;
  }
  page.model = model;
  $("model-info").textContent = `${model.id} · ${model.output_kind} model (${model.task_type}) · ` +
    `${model.ready ? "ready" : "loading…"} · DiT ${model.dit_precision || "?"}, VAE ${model.vae_precision || "?"}`;
  document.querySelectorAll(".video-only").forEach((element) => { element.hidden = model.output_kind !== "video"; });
  $("image-label").hidden = model.task_type === "T2I" || model.task_type === "T2V";
  $("image").required = model.task_type === "I2I" || model.task_type === "I2V";
  $("generate").disabled = !model.ready;
  if (!model.ready) setTimeout(loadModel, 2000);
  refreshGallery();
}

// -- the form ----------------------------------------------------------------------------------------------
function formParams() {
  const params = { prompt: $("prompt").value };
  const negative = $("negative-prompt").value.trim();
  if (negative) params.negative_prompt = negative;
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const width = number("width");
  const height = number("height");
  if ((width === undefined) !== (height === undefined)) throw new Error("give both width and height, or neither");
  if (width !== undefined) params.size = `${width}x${height}`;
  const fields = [["steps", "num_inference_steps"], ["seed", "seed"], ["preview-every", "preview_every"]];
  if (page.model.output_kind === "video") fields.push(["frames", "num_frames"], ["fps", "fps"]);
  for (const [id, name] of fields) {
    const value = number(id);
    if (value !== undefined) params[name] = value;
  }
  return params;
}

function multipart(params, fileField, file) {
  const form = new FormData();
  for (const [name, value] of Object.entries(params)) form.append(name, String(value));
  form.append(fileField, file);
  return form;
}

async function onSubmit(event) {
  event.preventDefault();
  showError(null);
  $("generate").disabled = true;
  try {
    const params = formParams();
    const file = $("image").files[0];
    startProgress();
    if (page.model.output_kind === "video") await runVideo(params, file);
    else await runImage(params, file);
  } catch (error) {
    showError(error.message);
    $("progress-text").textContent = "failed";
  } finally {
    $("generate").disabled = false;
    refreshGallery();
  }
}

// -- images: POST with stream=true, events on the response ------------------------------------------------
async function runImage(params, file) {
  const response = file
    ? await api("/v1/images/edits", { method: "POST", body: multipart({ ...params, stream: true }, "image", file) })
    : await api("/v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ...params, stream: true }),
    });
  const completed = [];
  for await (const { event, data } of readEvents(response)) {
    if (event === "error") throw new Error(data.error.message);
    if (event.endsWith(".progress")) showProgress(data);
    else if (event.endsWith(".partial_image")) {
      showProgress(data);
      showPreview(`data:image/${data.output_format};base64,${data.b64_json}`, data.output_index);
    } else if (event.endsWith(".completed")) completed.push(data);
  }
  if (!completed.length) throw new Error("the stream ended without an image");
  finishProgress();
  const sources = completed.map((data) => data.url || `data:image/${data.output_format};base64,${data.b64_json}`);
  const shown = { ...params, size: completed[0].size, seed: completed[0].seed };
  delete shown.preview_every;
  showResult(sources.map((src) => element("img", { src, className: "result-image", alt: params.prompt })), shown);
  for (const src of sources) page.images.unshift({ src, prompt: params.prompt, seed: completed[0].seed });
  page.images.length = Math.min(page.images.length, 24);
}

// -- videos: create the job, then follow GET /v1/videos/{id}/events ----------------------------------------
async function runVideo(params, file) {
  const created = file
    ? await api("/v1/videos", { method: "POST", body: multipart(params, "input_reference", file) })
    : await api("/v1/videos", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(params),
    });
  const video = await created.json();
  $("progress-text").textContent = `${video.id}: ${video.status}`;
  let final = null;
  for await (const { event, data } of readEvents(await api(`/v1/videos/${video.id}/events`))) {
    if (event === "error") throw new Error(data.error.message);
    if (event === "video.progress") showProgress(data);
    else if (event === "video.partial_image") {
      showProgress(data);
      showPreview(`data:image/png;base64,${data.b64_json}`, data.output_index);
    } else if (event === "video.completed" || event === "video.failed") final = data;
  }
  if (!final) throw new Error("the event stream ended before the job did");
  if (final.status === "failed") throw new Error(final.error ? final.error.message : "the video job failed");
  finishProgress();
  await showVideo(final, params);
}

async function showVideo(video, params) {
  const blob = await (await api(`/v1/videos/${video.id}/content`)).blob();
  const url = URL.createObjectURL(blob);
  const player = element("video", { src: url, controls: true, loop: true, className: "result-video" });
  const link = element("a", { href: url, download: `${video.id}.mp4`, id: "download", textContent: "Download MP4" });
  showResult([player, element("div", {}, [link])],
    { ...params, id: video.id, size: video.size, seconds: video.seconds, model: video.model });
}

// -- display -----------------------------------------------------------------------------------------------
function element(tag, properties = {}, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function startProgress() {
  $("live").hidden = false;
  $("previews").replaceChildren();
  $("progress-bar").value = 0;
  $("progress-text").textContent = "queued";
}

function showProgress(data) {
  const parts = [];
  if (data.status) parts.push(data.status);
  if (data.total_steps) {
    $("progress-bar").max = data.total_steps;
    $("progress-bar").value = data.step;
    parts.push(`step ${data.step}/${data.total_steps}`);
  } else if (data.progress !== undefined) {
    $("progress-bar").max = 100;
    $("progress-bar").value = data.progress;
    parts.push(`${data.progress}%`);
  }
  if (data.elapsed_s !== undefined && data.elapsed_s !== null) parts.push(`${data.elapsed_s.toFixed(1)} s elapsed`);
  if (data.eta_s !== undefined && data.eta_s !== null) parts.push(`about ${data.eta_s.toFixed(1)} s left`);
  $("progress-text").textContent = parts.join(" · ");
}

function showPreview(src, outputIndex) {
  let image = document.querySelector(`#previews img[data-output="${outputIndex}"]`);
  if (!image) {
    image = element("img", { alt: `preview of output ${outputIndex}` });
    image.dataset.output = outputIndex;
    $("previews").append(image);
  }
  image.src = src;
}

function finishProgress() {
  $("progress-bar").value = $("progress-bar").max;
  $("progress-text").textContent = "done";
}

function showResult(nodes, params) {
  $("result").hidden = false;
  $("result-media").replaceChildren(...nodes);
  $("result-params").replaceChildren(...Object.entries(params).map(([name, value]) =>
    element("tr", {}, [element("td", { textContent: name }), element("td", { textContent: String(value) })])));
}

async function refreshGallery() {
  if (!page.model) return;
  const cards = page.images.map((image) => element("div", { className: "card" }, [
    element("img", { src: image.src, alt: image.prompt }),
    element("div", { className: "prompt", textContent: image.prompt, title: image.prompt }),
    element("div", { className: "muted", textContent: `seed ${image.seed}` }),
  ]));
  if (page.model.output_kind === "video") {
    try {
      const videos = (await (await api("/v1/videos?limit=12")).json()).data;
      for (const video of videos) {
        const open = element("button", { type: "button", textContent: "open" });
        open.disabled = video.status !== "completed";
        open.addEventListener("click", () => showVideo(video, { prompt: video.prompt }).catch((e) => showError(e.message)));
        cards.push(element("div", { className: "card video-card" }, [
          element("div", { className: "prompt", textContent: video.prompt, title: video.prompt }),
          element("div", { className: "muted", textContent: `${video.status} · ${video.size} · ${video.seconds} s` }),
          open,
        ]));
      }
    } catch (error) {
      cards.push(element("div", { className: "error", textContent: `cannot list videos: ${error.message}` }));
    }
  }
  $("gallery").replaceChildren(...cards);
}

// -- start -------------------------------------------------------------------------------------------------
$("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, $("api-key").value);
  loadModel();
});
$("form").addEventListener("submit", onSubmit);
$("refresh").addEventListener("click", refreshGallery);
loadModel();
