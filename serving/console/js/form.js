// The submission form: image (drop, paste, file, URL) with preview, model and parameters from
// GET /api/v1/models (nothing hard-coded), estimate, submit with an Idempotency-Key, code.

import { api, storedKey } from "./api.js";
import { $, el, guarded, randomSeed, showError, usd } from "./util.js";

// Which field of the model catalogue gives each parameter's default and range.
const NUMERIC_FIELDS = [
  { name: "numFrames", label: "Frames", basic: true, def: "defaultNumFrames", range: "numFramesRange", step: 1 },
  { name: "fps", label: "Frames per second", basic: true, def: "defaultFps", range: "fpsRange", step: 1 },
  { name: "motionBucketId", label: "Motion (bucket id)", basic: true, def: "defaultMotionBucketId",
    range: "motionBucketIdRange", step: 1 },
  { name: "numInferenceSteps", label: "Denoising steps", def: "defaultSteps", range: "stepsRange", step: 1 },
  { name: "noiseAugStrength", label: "Noise augmentation", def: "defaultNoiseAugStrength",
    range: "noiseAugStrengthRange", step: 0.01 },
  { name: "minGuidanceScale", label: "Min guidance", def: "defaultMinGuidanceScale", range: "guidanceScaleRange", step: 0.1 },
  { name: "maxGuidanceScale", label: "Max guidance", def: "defaultMaxGuidanceScale", range: "guidanceScaleRange", step: 0.1 },
  { name: "width", label: "Width", def: "nativeWidth", range: "sizeRange", step: "sizeMultiple" },
  { name: "height", label: "Height", def: "nativeHeight", range: "sizeRange", step: "sizeMultiple" },
];

export class SubmitForm {
  constructor({ onAccepted, onModel }) {
    this.onAccepted = onAccepted;
    this.onModel = onModel;
    this.catalogue = null;
    this.image = null; // {blob, name} from a file, a drop or a paste
    this.inFlight = false;
    this.estimateTimer = null;
    this.previewUrl = null;
  }

  async load() {
    this.catalogue = (await api.models()).body;
    const select = $("model");
    select.replaceChildren(...this.catalogue.models.map((m) =>
      el("option", { value: m.name, text: m.randomWeights ? `${m.name} (random weights)` : m.name })));
    select.value = this.catalogue.default;
    const limits = this.catalogue.limits;
    $("priority").replaceChildren(...limits.priorities.map((p) => el("option", { value: p, text: p })));
    $("priority").value = limits.defaultPriority;
    $("provider").replaceChildren(...limits.providers.map((p) => el("option", { value: p, text: p })));
    $("provider").value = limits.defaultProvider;
    $("seed").max = limits.seedRange[1];
    $("interpolateFps").min = limits.interpolateFpsRange[0];
    $("interpolateFps").max = limits.interpolateFpsRange[1];
    $("outputs").replaceChildren(...limits.outputs.map((kind) => el("label", {},
      el("input", { type: "checkbox", name: "outputs", value: kind, checked: limits.defaultOutputs.includes(kind) }),
      " " + kind)));
    this.renderModel();
  }

  wire() {
    const form = $("submit-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      guarded(() => this.submit())();
    });
    form.addEventListener("input", (event) => {
      if (event.target.id === "image-url") this.useUrl(event.target.value.trim());
      this.scheduleEstimate();
    });
    $("model").addEventListener("change", () => this.renderModel());
    $("random-seed").addEventListener("click", () => {
      $("seed").value = randomSeed();
      this.scheduleEstimate();
    });
    $("image-file").addEventListener("change", (event) => {
      const file = event.target.files[0];
      if (file) this.useBlob(file, file.name);
    });
    const drop = $("drop");
    drop.addEventListener("click", () => $("image-file").click());
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        $("image-file").click();
      }
    });
    drop.addEventListener("dragover", (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      const file = [...(event.dataTransfer?.files || [])][0];
      if (file) this.useBlob(file, file.name);
    });
    document.addEventListener("paste", (event) => {
      const item = [...(event.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (!item) return;
      const blob = item.getAsFile();
      this.useBlob(blob, blob.name || "pasted." + (blob.type.split("/")[1] || "png"));
    });
    for (const button of document.querySelectorAll("[data-code]")) {
      button.addEventListener("click", () => this.showCode(button.dataset.code));
    }
  }

  get model() {
    return this.catalogue.models.find((m) => m.name === $("model").value);
  }

  renderModel() {
    const model = this.model;
    const make = (spec) => {
      const [low, high] = model[spec.range];
      const step = typeof spec.step === "string" ? model[spec.step] : spec.step;
      const id = spec.name;
      return el("div", { className: "row" },
        el("label", { for: id, text: spec.label }),
        el("input", { id, name: id, type: "number", min: low, max: high, step, value: model[spec.def],
          inputmode: step < 1 ? "decimal" : "numeric", "aria-describedby": `${id}-range`, dataset: { default: model[spec.def] } }),
        el("span", { id: `${id}-range`, className: "help", text: `${low}–${high}` }));
    };
    $("basic-fields").replaceChildren(...NUMERIC_FIELDS.filter((f) => f.basic).map(make));
    $("advanced-fields").replaceChildren(...NUMERIC_FIELDS.filter((f) => !f.basic).map(make));
    $("model-description").textContent = model.description;
    $("expected-size").textContent = `${model.name} works at ${model.nativeWidth}×${model.nativeHeight}; ` +
      "other sizes are resized to it.";
    this.onModel?.(model);
    this.scheduleEstimate();
  }

  useBlob(blob, name) {
    this.image = { blob, name };
    $("image-url").value = "";
    this.preview(URL.createObjectURL(blob), name);
  }

  useUrl(url) {
    if (!url) {
      $("preview-box").hidden = true;
      return;
    }
    this.image = null;
    $("image-file").value = "";
    this.preview(url, url);
  }

  preview(src, label) {
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
    this.previewUrl = src.startsWith("blob:") ? src : null;
    const img = $("preview");
    img.onload = () => {
      const model = this.model;
      $("preview-caption").textContent = `${label}: ${img.naturalWidth}×${img.naturalHeight}` +
        ` (the model expects ${model.nativeWidth}×${model.nativeHeight})`;
    };
    img.onerror = () => { $("preview-caption").textContent = `${label}: no preview (the server will fetch it)`; };
    img.src = src;
    $("preview-box").hidden = false;
  }

  /** The form's fields as the API names them; only values that differ from the model's defaults. */
  fields() {
    const fields = { model: $("model").value };
    for (const spec of NUMERIC_FIELDS) {
      const input = $(spec.name);
      if (input.value !== "" && input.value !== input.dataset.default) fields[spec.name] = Number(input.value);
    }
    if ($("seed").value !== "") fields.seed = Number($("seed").value);
    const outputs = [...document.querySelectorAll("input[name=outputs]:checked")].map((i) => i.value);
    const defaults = this.catalogue.limits.defaultOutputs;
    if (outputs.join() !== defaults.join()) fields.outputs = outputs;
    if ($("interpolateFps").value !== "") fields.interpolateFps = Number($("interpolateFps").value);
    if ($("loop").checked) fields.loop = true;
    if ($("priority").value !== this.catalogue.limits.defaultPriority) fields.priority = $("priority").value;
    if ($("provider").value !== this.catalogue.limits.defaultProvider) fields.provider = $("provider").value;
    if ($("webhookUrl").value.trim()) fields.webhookUrl = $("webhookUrl").value.trim();
    if ($("prompt").value.trim()) fields.prompt = $("prompt").value.trim();
    const metadata = $("metadata").value.trim();
    if (metadata) {
      try {
        fields.metadata = JSON.parse(metadata);
      } catch (_) {
        fields.metadata = metadata; // sent as typed: the API explains what is wrong with it
      }
    }
    return fields;
  }

  scheduleEstimate() {
    clearTimeout(this.estimateTimer);
    this.estimateTimer = setTimeout(() => this.estimate(), 250);
  }

  async estimate() {
    if (!this.catalogue) return;
    const box = $("estimate");
    try {
      const { body } = await api.estimate(this.fields());
      const detail = body.gpuSeconds !== null ? `${body.gpuSeconds} GPU-seconds` : `${body.credits} credits`;
      box.textContent = `Estimated cost: ${usd(body.estimatedCostUsd)} on ${body.provider} (${detail})`;
      box.classList.remove("bad");
    } catch (error) {
      box.textContent = `Cannot estimate: ${error.message}`;
      box.classList.add("bad");
    }
  }

  async submit() {
    if (this.inFlight) return; // the first click's request is still out
    const url = $("image-url").value.trim();
    if (!this.image && !url) {
      throw new Error("Choose, drop or paste an image, or give its URL.");
    }
    // One key per click: a retried or doubled request of this click makes one job.
    const idempotencyKey = crypto.randomUUID();
    this.inFlight = true;
    $("submit").disabled = true;
    showError(null);
    try {
      const fields = this.fields();
      let answer;
      if (this.image) {
        const form = new FormData();
        form.append("image", this.image.blob, this.image.name);
        for (const [name, value] of Object.entries(fields)) {
          form.append(name, typeof value === "object" && !Array.isArray(value) ? JSON.stringify(value) : String(value));
        }
        answer = await api.submitForm(form, idempotencyKey);
      } else {
        answer = await api.submitJson({ ...fields, imageUrl: url }, idempotencyKey);
      }
      this.onAccepted(answer.body);
    } finally {
      this.inFlight = false;
      $("submit").disabled = false;
    }
  }

  setSeed(seed) {
    $("seed").value = seed;
    this.scheduleEstimate();
  }

  showCode(kind) {
    const fields = this.fields();
    const url = $("image-url").value.trim();
    const base = location.origin;
    const key = storedKey();
    const masked = key ? `${key.slice(0, 8)}…` : "(none: authentication is off)";
    const file = this.image?.name || "photo.png";
    const text = { curl, node, python }[kind]({ base, fields, url, file, masked });
    const pre = $("code");
    pre.textContent = text;
    pre.hidden = false;
    pre.dataset.kind = kind;
    navigator.clipboard?.writeText(text).catch(() => { /* shown on the page either way */ });
  }
}

const formValue = (v) => (Array.isArray(v) ? v.join(",") : typeof v === "object" ? JSON.stringify(v) : String(v));
const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;

function curl({ base, fields, url, file, masked }) {
  const lines = [`# SVD_SERVE_API_KEY is your key (${masked})`,
    `curl -X POST ${base}/api/v1/animate-image \\`,
    `  -H "Authorization: Bearer $SVD_SERVE_API_KEY" \\`,
    `  -H "Idempotency-Key: $(uuidgen)" \\`];
  if (url) {
    lines.push(`  -H "Content-Type: application/json" \\`, `  -d ${shellQuote(JSON.stringify({ ...fields, imageUrl: url }))}`);
  } else {
    const parts = [`-F image=@${shellQuote(file)}`,
      ...Object.entries(fields).map(([k, v]) => `-F ${shellQuote(`${k}=${formValue(v)}`)}`)];
    lines.push(...parts.map((p, i) => `  ${p}${i < parts.length - 1 ? " \\" : ""}`));
  }
  return lines.join("\n");
}

function node({ base, fields, url, file, masked }) {
  const head = [`// SVD_SERVE_API_KEY is your key (${masked}); Node 20+`,
    `import { openAsBlob } from "node:fs";`, `import { randomUUID } from "node:crypto";`, ``];
  const headers = `{ Authorization: \`Bearer \${process.env.SVD_SERVE_API_KEY}\`, "Idempotency-Key": randomUUID()`;
  if (url) {
    return [...head,
      `const response = await fetch("${base}/api/v1/animate-image", {`,
      `  method: "POST",`,
      `  headers: ${headers}, "Content-Type": "application/json" },`,
      `  body: JSON.stringify(${JSON.stringify({ ...fields, imageUrl: url })}),`,
      `});`, `console.log(response.status, await response.json());`].join("\n");
  }
  return [...head, `const form = new FormData();`,
    `form.append("image", await openAsBlob(${JSON.stringify(file)}), ${JSON.stringify(file)});`,
    ...Object.entries(fields).map(([k, v]) => `form.append(${JSON.stringify(k)}, ${JSON.stringify(formValue(v))});`),
    `const response = await fetch("${base}/api/v1/animate-image", {`,
    `  method: "POST",`, `  headers: ${headers} },`, `  body: form,`, `});`,
    `console.log(response.status, await response.json());`].join("\n");
}

function python({ base, fields, url, file, masked }) {
  const head = [`# SVD_SERVE_API_KEY is your key (${masked})`, `import os`, `import uuid`, ``, `import httpx`, ``,
    `headers = {"Authorization": f"Bearer {os.environ['SVD_SERVE_API_KEY']}", "Idempotency-Key": str(uuid.uuid4())}`];
  if (url) {
    return [...head, `body = ${JSON.stringify({ ...fields, imageUrl: url })}`,
      `response = httpx.post("${base}/api/v1/animate-image", json=body, headers=headers)`,
      `print(response.status_code, response.json())`].join("\n").replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False");
  }
  const data = Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, formValue(v)]));
  return [...head, `data = ${JSON.stringify(data)}`,
    `with open(${JSON.stringify(file)}, "rb") as image:`,
    `    response = httpx.post("${base}/api/v1/animate-image", data=data, files={"image": image}, headers=headers)`,
    `print(response.status_code, response.json())`].join("\n");
}
