/* MailGenius built-in monitoring page: polls the operator API and the page's own JSON every
 * few seconds and redraws in place (no reload). No build step, no inline script (strict CSP). */
(function () {
  "use strict";

  const body = document.body;
  const API = body.dataset.api;               // the page's own JSON (charts, alerts, logs, imports)
  const REFRESH_MS = Number(body.dataset.refreshMs) || 5000;
  const CHART_REFRESH = { "1h": 5000, "6h": 30000, "24h": 60000 };
  const MAX_LOG_ROWS = 500;

  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // -- formatting ---------------------------------------------------------------------------
  const ICONS = { healthy: "✔", ok: "✔", resolved: "✔", degraded: "▲", warning: "▲",
    unhealthy: "✖", critical: "✖", error: "✖", failed: "✖", open: "●", unknown: "?" };

  function badge(status, text) {
    const s = String(status || "unknown").toLowerCase();
    return el("span", { class: `status status-${s.replace(/[^a-z]/g, "")}` },
      el("span", { class: "icon", "aria-hidden": "true", text: ICONS[s] || "•" }), " ",
      el("span", { class: "label", text: text || s }));
  }

  function isNum(v) { return typeof v === "number" && isFinite(v); }

  function fmt(v, kind) {
    if (!isNum(v)) return "—";
    switch (kind) {
      case "ms": return v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
      case "s->ms": return fmt(v * 1000, "ms");
      case "pct": return `${v.toFixed(v < 10 ? 2 : 1)} %`;
      case "ratio->pct": return fmt(v * 100, "pct");
      case "rate": return `${v < 10 ? v.toFixed(2) : Math.round(v)}/s`;
      case "int": return Math.round(v).toLocaleString("en-US");
      case "num": return v < 10 ? v.toFixed(2) : Math.round(v).toLocaleString("en-US");
      case "dur": return duration(v);
      default: return String(v);
    }
  }

  function duration(sec) {
    if (!isNum(sec)) return "—";
    if (sec < 60) return `${Math.round(sec)} s`;
    if (sec < 3600) return `${Math.floor(sec / 60)} min ${Math.round(sec % 60)} s`;
    if (sec < 86400) return `${Math.floor(sec / 3600)} h ${Math.round((sec % 3600) / 60)} min`;
    return `${(sec / 86400).toFixed(1)} d`;
  }

  function timeOf(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toISOString().replace("T", " ").slice(0, 19);
  }

  // -- fetching -----------------------------------------------------------------------------
  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function getJSON(url, { allowStatus = [] } = {}) {
    const resp = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (resp.status === 401) { // the session expired or the key was revoked: back to the login form
      window.location.assign(body.dataset.base);
      throw new HttpError(401, "signed out");
    }
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok && !allowStatus.includes(resp.status)) {
      const msg = data && data.error ? data.error.message : `HTTP ${resp.status}`;
      throw new HttpError(resp.status, msg);
    }
    return data;
  }

  // -- banners (a backend being down is shown, never fatal) -----------------------------------
  const banners = new Map();
  function setBanner(id, message) {
    if (message) banners.set(id, message); else banners.delete(id);
    const host = $("#banners");
    // one Prometheus banner is enough: the charts' own says it when both see it down
    const shown = Array.from(banners.entries()).filter(([key]) => !(key === "summary-prometheus" && banners.has("prometheus")));
    host.replaceChildren(...shown.map(([key, msg]) =>
      el("p", { class: "banner", role: "alert", "data-banner": key },
        el("span", { "aria-hidden": "true", text: "⚠ " }), msg)));
  }

  function sectionError(section, err) {
    const host = $(section);
    let note = $(".notice", host);
    if (!err) { if (note) note.remove(); return; }
    if (!note) { note = el("p", { class: "notice", role: "status" }); $("h2", host).after(note); }
    note.textContent = `⚠ unavailable: ${err.message || err}`;
  }

  function fillTable(table, rows, cols, emptyText) {
    const tbody = $("tbody", table);
    if (!rows.length) {
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: String(cols), class: "empty", text: emptyText })));
      return;
    }
    tbody.replaceChildren(...rows);
  }

  // -- health ---------------------------------------------------------------------------------
  async function loadHealth() {
    const data = await getJSON("/api/health", { allowStatus: [503] });
    const overall = $("#overall");
    const status = (data && data.status) || "unknown";
    overall.className = `status status-${status}`;
    overall.replaceChildren(el("span", { class: "icon", "aria-hidden": "true", text: ICONS[status] || "?" }), " ",
      el("span", { class: "label", text: `System ${status}` }));
    const checks = (data && data.checks) || {};
    const rows = Object.entries(checks).map(([name, c]) => el("tr", { "data-check": name },
      el("th", { scope: "row", text: name }),
      el("td", {}, badge(c.status)),
      el("td", { class: "num", text: isNum(c.latency_ms) ? `${c.latency_ms.toFixed(1)} ms` : "—" }),
      el("td", { class: "detail", text: c.detail || "" })));
    fillTable($("#health-table"), rows, 4, "no checks reported");
  }

  // -- operator summary (database, leads, campaigns; email and queue figures) -----------------
  function summaryBlock(title, pairs) {
    const dl = el("dl");
    for (const [k, v] of pairs) dl.append(el("dt", { text: k }), el("dd", { text: v }));
    return el("section", {}, el("h3", { text: title }), dl);
  }

  async function loadSummary() {
    const s = await getJSON("/api/monitoring/metrics");
    const prom = s.prometheus || {};
    setBanner("summary-prometheus", prom.reachable === false
      ? `Prometheus unreachable (operator summary): ${prom.error || "no answer"}` : null);
    const db = s.database || {}, qp = db.query_performance || {}, chr = db.cache_hit_ratio || {};
    const leads = s.lead_metrics || {}, camp = s.campaign_metrics || {}, em = s.email_stats || {};
    const blocks = [
      summaryBlock("database", db.error ? [["error", db.error]] : [
        ["avg query time", fmt(qp.avg_query_time, "ms")],
        ["slow queries", fmt(qp.slow_queries, "int")],
        ["connections", `${fmt(qp.active_connections, "int")} / ${fmt(qp.max_connections, "int")}`],
        ["cache hit ratio", fmt(chr.current, "pct")]]),
      summaryBlock("leads", [
        ["total", fmt(leads.total_leads, "int")], ["active", fmt(leads.active_leads, "int")],
        ["growth (1 d)", fmt(leads.growth_rate, "pct")],
        ["import success", fmt(leads.import_success_rate, "pct")],
        ["validation errors", fmt(leads.validation_error_rate, "pct")]]),
      summaryBlock("campaigns", [
        ["active", fmt(camp.active_campaigns, "int")], ["completed", fmt(camp.completed_campaigns, "int")],
        ["avg open rate", fmt(camp.avg_open_rate, "pct")], ["avg click rate", fmt(camp.avg_click_rate, "pct")]]),
      summaryBlock("email (24 h)", [
        ["sent last hour", fmt(em.sent_per_hour, "int")], ["delivery", fmt(em.delivery_rate, "pct")],
        ["bounce", fmt(em.bounce_rate, "pct")], ["open", fmt(em.open_rate, "pct")],
        ["click", fmt(em.click_rate, "pct")]]),
    ];
    // campaigns a guard-rail paused (bounce, error or complaint rate), with the reason
    const paused = camp.auto_paused || [];
    if (paused.length) {
      blocks.push(el("section", { "data-auto-paused": String(paused.length) },
        el("h3", { text: "auto-paused campaigns" }),
        el("ul", {}, ...paused.map((c) => el("li", { "data-campaign": String(c.id) },
          badge("degraded", "paused"), ` #${c.id} ${c.name}: `, el("span", { class: "detail", text: c.pause_reason }))))));
    }
    $("#summary").replaceChildren(el("div", { class: "summary-grid" }, ...blocks));
    return s;
  }

  // -- queues ---------------------------------------------------------------------------------
  async function loadQueues() {
    const data = await getJSON("/api/queue/status");
    const queues = (data && data.queues) || {};
    const rows = Object.entries(queues).map(([name, q]) => el("tr", { "data-queue": name },
      el("th", { scope: "row", text: name }),
      el("td", { class: "num", "data-field": "waiting", text: fmt(q.waiting, "int") }),
      el("td", { class: "num", text: fmt(q.delayed, "int") }),
      el("td", { class: "num", "data-field": "dead" }, q.dead > 0 ? badge("error", fmt(q.dead, "int")) : fmt(q.dead, "int")),
      el("td", { class: "num", "data-field": "workers" },
        q.workers > 0 ? fmt(q.workers, "int") : badge(q.waiting > 0 ? "unhealthy" : "degraded", "0 (none)")),
      el("td", { class: "num", text: isNum(q.oldest_age_seconds) && q.waiting > 0 ? duration(q.oldest_age_seconds) : "—" })));
    fillTable($("#queues-table"), rows, 6, "no queues reported");
  }

  // -- imports --------------------------------------------------------------------------------
  async function loadImports() {
    const data = await getJSON(`${API}/imports`);
    const list = [...(data.active || []), ...(data.recent || [])];
    $("#imports-active").textContent = String((data.active || []).length);
    const rows = list.map((im) => {
      const pct = isNum(im.progress) ? `${(im.progress * 100).toFixed(0)} %` : "";
      const progress = `${fmt(im.processed_rows, "int")}${isNum(im.total_rows) ? " / " + fmt(im.total_rows, "int") : ""} ${pct}`;
      return el("tr", { "data-import": String(im.id) },
        el("th", { scope: "row" }, `#${im.id} `, el("span", { class: "detail", text: im.filename })),
        el("td", {}, badge(im.status)),
        el("td", { class: "num", text: progress.trim() }),
        el("td", { class: "num", text: fmt(im.rows_per_second, "num") }),
        el("td", { class: "num", text: im.status === "running" ? duration(im.eta_seconds) : "—" }),
        el("td", { class: "num", text: fmt(im.invalid, "int"), title: im.error || "" }));
    });
    fillTable($("#imports-table"), rows, 6, "no imports yet");
  }

  // -- alerts and incidents -------------------------------------------------------------------
  async function loadAlerts() {
    const data = await getJSON(`${API}/alerts`);
    const list = $("#alerts-list");
    setBanner("alertmanager", data.ok ? null : data.error);
    if (!data.ok) {
      list.replaceChildren(el("li", { class: "empty", text: data.error }));
      $("#alerts-count").textContent = "";
      return;
    }
    $("#alerts-count").textContent = `(${data.alerts.length})`;
    if (!data.alerts.length) {
      list.replaceChildren(el("li", { class: "empty" }, badge("ok", "no active alert")));
      return;
    }
    list.replaceChildren(...data.alerts.map((a) => el("li", { "data-alert": a.alertname },
      badge(a.severity || "unknown", a.severity || "alert"), " ",
      el("strong", { text: a.alertname }), a.service ? ` · ${a.service}` : "",
      ` · since ${timeOf(a.starts_at)}`,
      el("span", { class: "summary", text: a.summary || a.description || "" }))));
  }

  async function loadIncidents() {
    const data = await getJSON("/api/incidents?limit=10");
    const open = Object.values(data.open || {}).reduce((a, b) => a + b, 0);
    $("#incidents-open").replaceChildren(open > 0 ? badge("open", String(open)) : badge("ok", "0"));
    $("#incidents-mttr").textContent = duration(data.mttr_seconds);
    $("#incidents-mtbf").textContent = duration(data.mtbf_seconds);
    const rows = (data.incidents || []).map((i) => el("tr", {},
      el("th", { scope: "row" }, i.alertname, i.summary ? el("span", { class: "detail", text: ` ${i.summary}` }) : null),
      el("td", {}, badge(i.severity)),
      el("td", { text: timeOf(i.started_at) }),
      el("td", {}, badge(i.status)),
      el("td", { class: "num", text: duration(i.duration_seconds) })));
    fillTable($("#incidents-table"), rows, 5, "no incidents recorded");
  }

  // -- charts (uPlot) and the figures computed with them -----------------------------------------
  const PALETTE = ["#2457c5", "#c0392b", "#1f7a3d", "#8a5a00", "#6b3fa0", "#0f7c8c", "#a0406b"];
  const DASHES = [[], [6, 3], [2, 3], [10, 4, 2, 4]];
  const charts = new Map();

  function chartWidth(host) { return Math.max(240, host.clientWidth || 240); }

  function unitFormatter(unit) {
    if (unit === "s") return (u, vals) => vals.map((v) => (v === null ? "" : fmt(v, "s->ms")));
    return (u, vals) => vals.map((v) => (v === null ? "" : (Math.abs(v) < 10 ? +v.toFixed(2) : Math.round(v)).toLocaleString("en-US")));
  }

  function drawChart(spec, span) {
    const host = $(`[data-chart="${spec.id}"]`);
    if (!host) return;
    const title = el("h4", { text: `${spec.title} (${spec.unit === "s" ? "ms" : spec.unit})` });
    const prev = charts.get(spec.id);
    if (prev) { prev.destroy(); charts.delete(spec.id); }
    if (!spec.series.length) {
      host.replaceChildren(title, el("p", { class: "nodata", text: spec.errors && spec.errors.length ? `query failed: ${spec.errors[0]}` : "no data in this range yet" }));
      host.dataset.state = "empty";
      return;
    }
    const xs = Array.from(new Set(spec.series.flatMap((s) => s.points.map((p) => p[0])))).sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const data = [xs];
    const series = [{}];
    spec.series.forEach((s, i) => {
      const ys = new Array(xs.length).fill(null);
      for (const [t, v] of s.points) ys[index.get(t)] = v;
      data.push(ys);
      series.push({ label: s.name, stroke: PALETTE[i % PALETTE.length], width: 2,
        dash: DASHES[Math.floor(i / 2) % DASHES.length], spanGaps: false,
        value: (u, v) => (v === null ? "—" : spec.unit === "s" ? fmt(v, "s->ms") : fmt(v, "num")) });
    });
    const plotHost = el("div", { class: "plot", role: "img", "aria-label": `${spec.title} chart` });
    host.replaceChildren(title, plotHost);
    host.dataset.state = "drawn";
    const opts = {
      width: chartWidth(host), height: 170, series, legend: { show: true },
      // the x axis always spans the selected range, however little data there is yet
      scales: { x: { time: true, range: () => [span.start, span.end] } },
      axes: [{ stroke: "#5b6573" }, { stroke: "#5b6573", size: 70, values: unitFormatter(spec.unit) }],
      cursor: { drag: { x: false, y: false } },
    };
    charts.set(spec.id, new uPlot(opts, data, plotHost)); // eslint-disable-line no-undef
  }

  function fillStats(stats) {
    for (const dd of $$("[data-stat]")) {
      const st = stats[dd.dataset.stat];
      const v = st ? st.value : null;
      const kind = { ms: "s->ms", pct: "ratio->pct" }[dd.dataset.fmt] || dd.dataset.fmt;
      dd.textContent = fmt(v, kind);
    }
  }

  async function loadSeries() {
    const range = $("#range").value;
    const data = await getJSON(`${API}/series?range=${encodeURIComponent(range)}`);
    if ($("#range").value !== range) return; // the operator picked another range meanwhile
    if (!data.ok) {
      setBanner("prometheus", `${data.error} — charts and figures paused; the rest of the page still works.`);
      for (const host of $$("[data-chart]")) {
        const prev = charts.get(host.dataset.chart);
        if (prev) { prev.destroy(); charts.delete(host.dataset.chart); }
        host.replaceChildren(el("p", { class: "nodata", text: "Prometheus unreachable" }));
        host.dataset.state = "unreachable";
      }
      fillStats({});
      return;
    }
    setBanner("prometheus", null);
    data.charts.forEach((spec) => drawChart(spec, data));
    fillStats(data.stats || {});
  }

  window.addEventListener("resize", () => {
    for (const [id, chart] of charts) {
      const host = $(`[data-chart="${id}"]`);
      if (host) chart.setSize({ width: chartWidth(host), height: 170 });
    }
  });

  // -- logs -----------------------------------------------------------------------------------
  // gen counts filter changes: a reply for older filters is dropped, so rows of two filter
  // settings never mix, whatever order the requests finish in
  const logState = { lastId: null, rows: 0, gen: 0 };

  function logQuery() {
    const form = $("#log-filters");
    const params = new URLSearchParams();
    for (const name of ["service", "level", "q"]) {
      const v = form.elements[name].value.trim();
      if (v) params.set(name, v);
    }
    return params;
  }

  function updateExportLinks() {
    for (const fmtName of ["csv", "ndjson"]) {
      const p = logQuery();
      p.set("format", fmtName);
      $(`#export-${fmtName}`).href = `${API}/logs/export?${p}`;
    }
  }

  function logRow(e) {
    return el("tr", { "data-log-id": e.id, "data-level": e.level, "data-service": e.service },
      el("td", { text: timeOf(e.ts) }),
      el("td", {}, badge(e.level)),
      el("td", { text: e.service }),
      el("td", { class: "msg" }, e.message,
        el("span", { class: "logger", text: `${e.logger}${e.request_id ? " · request " + e.request_id : ""}` })));
  }

  async function loadLogs(reset) {
    if (reset) { logState.gen += 1; logState.lastId = null; }
    const gen = logState.gen;
    const after = logState.lastId;
    const p = logQuery();
    if (after) p.set("after", after);
    const data = await getJSON(`${API}/logs?${p}`);
    if (gen !== logState.gen || after !== logState.lastId) return; // superseded meanwhile
    const tbody = $("#logs-table tbody");
    if (!after) { tbody.replaceChildren(); logState.rows = 0; }
    // newest first on screen; the entries come oldest first
    const fresh = data.entries.slice().reverse().map(logRow);
    if (fresh.length) {
      for (const r of $$("tr:not([data-log-id])", tbody)) r.remove();
      tbody.prepend(...fresh);
      while (tbody.rows.length > MAX_LOG_ROWS) tbody.deleteRow(-1);
      logState.rows = tbody.rows.length;
    }
    if (!tbody.rows.length) tbody.append(el("tr", {}, el("td", { colspan: "4", class: "empty", text: "no matching warnings or errors" })));
    logState.lastId = data.last_id || after;
    $("#logs-count").textContent = `(${logState.rows} shown)`;
    tbody.closest("table").dataset.filters = p.toString().replace(/&?after=[^&]*/, "");
  }

  let filterTimer = null;
  $("#log-filters").addEventListener("input", () => {
    clearTimeout(filterTimer);
    updateExportLinks();
    filterTimer = setTimeout(() => guarded("#sec-logs", () => loadLogs(true)), 250);
  });
  $("#log-filters").addEventListener("submit", (ev) => { ev.preventDefault(); guarded("#sec-logs", () => loadLogs(true)); });

  // -- the poll loop ----------------------------------------------------------------------------
  async function guarded(section, fn) {
    try {
      await fn();
      sectionError(section, null);
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) return;
      sectionError(section, err);
    }
  }

  // each source polls on its own: a slow one (e.g. Prometheus under load) never holds back the
  // others; a source still in flight is skipped, not queued
  const inflight = new Set();
  function run(name, section, fn) {
    if (inflight.has(name)) return;
    inflight.add(name);
    guarded(section, fn).finally(() => {
      inflight.delete(name);
      const now = new Date();
      const t = $("#updated");
      t.textContent = now.toISOString().slice(11, 19) + " UTC";
      t.setAttribute("datetime", now.toISOString());
    });
  }

  let lastChartLoad = 0;
  function tick(forceCharts) {
    const range = $("#range").value;
    run("health", "#sec-health", loadHealth);
    run("summary", "#sec-summary", loadSummary);
    run("queues", "#sec-queues", loadQueues);
    run("imports", "#sec-imports", loadImports);
    run("alerts", "#sec-alerts", loadAlerts);
    run("incidents", "#sec-alerts", loadIncidents);
    run("logs", "#sec-logs", () => loadLogs(false));
    if (forceCharts || Date.now() - lastChartLoad >= (CHART_REFRESH[range] || REFRESH_MS) - 250) {
      if (forceCharts) inflight.delete("series"); // a new range: its answer supersedes the old one
      lastChartLoad = Date.now();
      run("series", "#sec-api", loadSeries);
    }
    body.dataset.polls = String(Number(body.dataset.polls || 0) + 1);
  }

  function updateDataExport() {
    $("#export-series").href = `${API}/series?range=${encodeURIComponent($("#range").value)}`;
  }
  $("#range").addEventListener("change", () => { updateDataExport(); tick(true); });
  updateDataExport();
  updateExportLinks();
  tick(true);
  setInterval(() => { if (!document.hidden) tick(false); }, REFRESH_MS);
})();
