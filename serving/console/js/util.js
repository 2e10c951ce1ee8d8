// Small DOM helpers shared by the console's modules.

export const $ = (id) => document.getElementById(id);

/** Build an element: el("a", {href, text: "x", className}, child, ...). Text is never parsed as HTML. */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

/** Show an error the way the API worded it (`detail`), never a blank screen. */
export function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.textContent = error.message || String(error);
  box.dataset.code = error.code || "";
  box.hidden = false;
}

export function usd(value) {
  if (value === null || value === undefined) return "–";
  return value < 0.01 ? `$${value.toFixed(4)}` : `$${value.toFixed(2)}`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

/** "in 12 s" for a time ahead, "now" when it has passed. */
export function fromNow(iso) {
  if (!iso) return "–";
  const seconds = Math.round((new Date(iso) - Date.now()) / 1000);
  if (seconds <= 0) return "now";
  return seconds < 90 ? `in ${seconds} s` : `in ${Math.round(seconds / 60)} min`;
}

export function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

/** Swallow-nothing wrapper for event handlers: errors land in the error box. */
export function guarded(handler) {
  return async (...args) => {
    try {
      await handler(...args);
    } catch (error) {
      showError(error);
    }
  };
}
