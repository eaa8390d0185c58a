"""The viewer page: one HTML document with its style and script inline; the report's data goes in `__DATA__`."""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  body { font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 14px 24px; }
  header h1 { font-size: 18px; margin: 0 0 4px; }
  header .meta { opacity: .8; font-size: 12px; }
  main { padding: 16px 24px; max-width: 1200px; }
  .controls { display: flex; gap: 12px; align-items: center; margin: 12px 0; flex-wrap: wrap; }
  .controls input { padding: 6px 10px; width: 280px; border: 1px solid #b8bfcc; border-radius: 6px; }
  .controls select { padding: 6px; border-radius: 6px; }
  table.summary { border-collapse: collapse; margin: 8px 0 16px; background: #fff; }
  table.summary td, table.summary th { border: 1px solid #d7dbe3; padding: 4px 10px; text-align: right; }
  .head-card { background: #fff; border: 1px solid #d7dbe3; border-radius: 8px; margin: 12px 0; padding: 12px 16px; }
  .head-card h2 { font-size: 15px; margin: 0 0 6px; }
  .stats { color: #535d70; font-size: 12px; margin-bottom: 6px; }
  .badge { display: inline-block; border-radius: 10px; padding: 1px 8px; margin: 0 4px 4px 0; font-size: 12px;
           background: #eef0f4; }
  .badge.hit { background: #ffd9a8; font-weight: 600; }
  .chips { margin: 4px 0; font-size: 12px; }
  .chip { display: inline-block; font-family: ui-monospace, monospace; border-radius: 4px; padding: 0 5px;
          margin: 0 3px 3px 0; white-space: pre; }
  .chip.up { background: #d8f0dc; } .chip.down { background: #f6d6d6; }
  .context { font-family: ui-monospace, monospace; font-size: 12.5px; padding: 3px 0; cursor: pointer;
             border-top: 1px dashed #e3e6ec; white-space: pre-wrap; word-break: break-all; }
  .context .act { display: inline-block; width: 64px; color: #535d70; }
  .context.weak .act { color: #9aa3b3; }
  .tok { border-radius: 2px; }
  .tok.focus { outline: 2px solid #1d2330; }
  .legend { font-size: 12px; color: #535d70; }
  .more { margin: 12px 0; }
</style>
</head>
<body>
<header><h1>__TITLE__</h1><div class="meta" id="meta"></div></header>
<main>
  <table class="summary" id="summary"></table>
  <div class="controls">
    <input id="search" type="search" placeholder="search: head number or promoted token">
    <label>sort by <select id="sort"></select></label>
    <span class="legend">Tokens are shaded by the head's activation; click a context to shade it by the
      z-pattern: each earlier token's contribution to the activation at the outlined token (tokens before the
      window that contribute are shown first, with their position).</span>
  </div>
  <div id="heads"></div>
  <button class="more" id="more">show more heads</button>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const tokens = data.tokens;
  const startWithZ = window.location.hash === "#z";  // a link to the page with every context in z-pattern view
  const text = (id) => (tokens[String(id)] !== undefined ? tokens[String(id)] : "<" + id + ">");
  const shade = (value, scale) => {
    if (!scale || !value) return "transparent";
    const alpha = Math.min(1, Math.abs(value) / scale);
    return value > 0 ? "rgba(255,140,0," + alpha.toFixed(3) + ")" : "rgba(40,110,255," + alpha.toFixed(3) + ")";
  };
  const el = (tag, cls, content) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (content !== undefined) node.textContent = content;
    return node;
  };
  document.getElementById("meta").textContent = data.meta.description;
  const summary = document.getElementById("summary");
  const header = summary.insertRow();
  ["detector", "Lorsa heads (of " + data.meta.n_heads + ")", "base heads (of " + data.meta.n_base_heads + ")"]
    .forEach((label) => header.appendChild(el("th", "", label)));
  data.meta.detectors.forEach((name) => {
    const row = summary.insertRow();
    [name, data.counts.lorsa[name], data.counts.base[name]].forEach((value) => row.insertCell().textContent = value);
  });
  const sort = document.getElementById("sort");
  ["frequency"].concat(data.meta.detectors).forEach((name) => sort.appendChild(new Option(name, name)));

  function renderContext(context, maxActivation) {
    const line = el("div", "context " + context.kind);
    line.appendChild(el("span", "act", (context.kind === "weak" ? "~" : "") + context.activation.toFixed(3)));
    const earlier = (context.earlier || []).map(([position, id, value]) => {
      const span = el("span", "tok shaded earlier", "[" + position + "]" + text(id));
      span.title = "token " + position + ", before the window: z contribution " + value.toFixed(3);
      line.appendChild(span);
      return [span, value];
    });
    if (earlier.length) line.appendChild(el("span", "earlier gap", " … "));
    const spans = context.tokens.map((id, i) => {
      const span = el("span", "tok shaded" + (i === context.focus ? " focus" : ""), text(id));
      span.title = "activation " + context.activations[i].toFixed(3) + "  z contribution " + context.z[i].toFixed(3);
      line.appendChild(span);
      return span;
    });
    let byZ = startWithZ;
    const paint = () => {
      const values = byZ ? context.z : context.activations;
      const outside = earlier.map(([, value]) => Math.abs(value));
      const scale = byZ ? Math.max(...context.z.map(Math.abs), ...outside) : maxActivation;
      spans.forEach((span, i) => span.style.background = shade(values[i], scale));
      earlier.forEach(([span, value]) => span.style.background = byZ ? shade(value, scale) : "transparent");
      line.querySelectorAll(".earlier").forEach((node) => node.style.display = byZ ? "" : "none");
      line.dataset.mode = byZ ? "z" : "activation";
    };
    line.addEventListener("click", () => { byZ = !byZ; paint(); });
    paint();
    return line;
  }

  function renderHead(head) {
    const card = el("div", "head-card");
    card.dataset.head = head.head;
    card.appendChild(el("h2", "", "Head " + head.head + "  (QK group " + head.group + ")"));
    card.appendChild(el("div", "stats", "fires on " + (100 * head.frequency).toFixed(3) +
      "% of tokens, mean activation when firing " + head.mean.toFixed(3)));
    const badges = el("div");
    Object.entries(head.scores).forEach(([name, value]) => {
      const hit = value >= data.meta.threshold ? " hit" : "";
      badges.appendChild(el("span", "badge" + hit, name + " " + value.toFixed(2)));
    });
    card.appendChild(badges);
    [["promotes", head.promoted, "up"], ["suppresses", head.suppressed, "down"]].forEach(([label, list, cls]) => {
      const chips = el("div", "chips", label + ": ");
      list.forEach(([id, value]) => {
        const chip = el("span", "chip " + cls, text(id));
        chip.title = value.toFixed(3);
        chips.appendChild(chip);
      });
      card.appendChild(chips);
    });
    const maxActivation = Math.max(1e-12, ...head.contexts.map((c) => Math.max(...c.activations.map(Math.abs))));
    head.contexts.forEach((context) => card.appendChild(renderContext(context, maxActivation)));
    return card;
  }

  const container = document.getElementById("heads");
  const search = document.getElementById("search");
  let shown = 40;
  function matches(head, query) {
    if (!query) return true;
    if (String(head.head) === query) return true;
    return head.promoted.some(([id]) => text(id).toLowerCase().includes(query.toLowerCase()));
  }
  function render() {
    const key = sort.value;
    const value = (head) => (key === "frequency" ? head.frequency : head.scores[key] || 0);
    const heads = data.heads.filter((head) => matches(head, search.value.trim())).sort((a, b) => value(b) - value(a));
    container.replaceChildren(...heads.slice(0, shown).map(renderHead));
    document.getElementById("more").style.display = heads.length > shown ? "" : "none";
  }
  sort.addEventListener("change", render);
  search.addEventListener("input", render);
  document.getElementById("more").addEventListener("click", () => { shown += 40; render(); });
  render();
  document.body.dataset.rendered = "true";
})();
</script>
</body>
</html>
"""
