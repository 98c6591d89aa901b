// switch-board's page: polls the server's JSON API and draws the runs you tick.
// Everything shown comes from /api/*; text from the runs is set as text, never as HTML.
'use strict';

const POINTS = 2000;  // points per series asked of the server (it downsamples)
const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2',
                 '#17becf', '#7f7f7f', '#bcbd22'];

const state = {
  runs: [],             // /api/runs' runs
  sweeps: [],           // /api/runs' sweeps
  diffKeys: [],
  ticked: new Set(),    // ids of the runs drawn
  firstList: true,
  series: new Map(),    // id -> /api/run answer
  runErrors: new Map(), // id -> why its last /api/run failed (the others still update)
  sweepCurves: new Map(),  // sweep id -> /api/sweep answer
  sort: new Map(),      // sweep id -> {key, desc}
  colors: new Map(),    // run id -> colour, kept while the run is listed
  pollMs: 2000,
};
// For tests and the curious: how many polls ended, and the last error.
window.switchBoard = {polls: 0, errors: 0, lastError: null, state};

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, children = []) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'text') e.textContent = v;
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};

async function getJSON(url) {
  const res = await fetch(url, {cache: 'no-store'});
  const body = await res.json().catch(() => ({error: res.statusText}));
  if (!res.ok) {
    const err = new Error(`${url}: ${res.status} ${body.error || ''}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

const fmt = {
  num: (v, d = 4) => (v === null || v === undefined ? '' : Number(v).toFixed(d)),
  int: (v) => (v === null || v === undefined ? '' : Math.round(v).toLocaleString('en-US')),
  secs: (v) => {
    if (v === null || v === undefined) return '';
    if (v < 120) return `${v.toFixed(0)} s`;
    if (v < 7200) return `${(v / 60).toFixed(1)} min`;
    return `${(v / 3600).toFixed(1)} h`;
  },
  value: (v) => (v === null || v === undefined ? '' : typeof v === 'string' ? v : JSON.stringify(v)),
};

function colorOf(id) {
  if (!state.colors.has(id)) {
    const used = new Set(state.colors.values());
    const free = PALETTE.find((c) => !used.has(c));
    state.colors.set(id, free || PALETTE[state.colors.size % PALETTE.length]);
  }
  return state.colors.get(id);
}

// ---- the list of runs ------------------------------------------------------------------

function defaultTicks(runs) {
  // Runs training now, else the whole list when short, else the last three.
  const live = runs.filter((r) => r.status === 'training').map((r) => r.id);
  if (live.length) return live.slice(0, 6);
  return runs.slice(runs.length <= 4 ? 0 : -3).map((r) => r.id);
}

function renderRuns() {
  const head = $('runs').tHead, body = $('runs').tBodies[0];
  const cols = ['', 'run', 'status', 'step', 'best val', 'val', 'train loss', 'lr', 'tokens/s',
                'wall'];
  head.replaceChildren(el('tr', {}, [...cols.map((c, i) => el('th', {text: c, class: i === 1 ? 'name' : ''})),
                                     ...state.diffKeys.map((k) => el('th', {text: k, class: 'name'}))]));
  const rows = state.runs.map((r) => {
    const box = el('input', {type: 'checkbox', 'data-id': r.id});
    box.checked = state.ticked.has(r.id);
    box.addEventListener('change', () => {
      if (box.checked) state.ticked.add(r.id);
      else state.ticked.delete(r.id);
      refreshSeries().then(renderAll);
    });
    const name = el('td', {class: 'name', title: r.id}, [
      el('span', {class: 'swatch'}), r.name]);
    name.firstChild.style.background = state.ticked.has(r.id) ? colorOf(r.id) : 'transparent';
    const step = r.steps ? `${fmt.int(r.step)} / ${fmt.int(r.steps)}` : fmt.int(r.step);
    const status = el('td', {}, [el('span', {class: `status ${r.status}`, text: r.status})]);
    if (state.runErrors.has(r.id))
      status.append(el('span', {class: 'warn', title: state.runErrors.get(r.id), text: ' not updating'}));
    if (r.malformed > 0)
      status.append(el('span', {class: 'warn', title: 'metrics lines that are not JSON records',
                                text: ` ${r.malformed} bad line${r.malformed > 1 ? 's' : ''}`}));
    return el('tr', {'data-id': r.id}, [
      el('td', {}, [box]), name, status, el('td', {text: step}),
      el('td', {text: fmt.num(r.best_val)}), el('td', {text: fmt.num(r.last_val)}),
      el('td', {text: fmt.num(r.train_loss)}), el('td', {text: r.lr == null ? '' : r.lr.toExponential(2)}),
      el('td', {text: fmt.int(r.tokens_per_s)}), el('td', {text: fmt.secs(r.wall_s)}),
      ...state.diffKeys.map((k) => el('td', {class: 'key', text: fmt.value(r.diff[k])})),
    ]);
  });
  body.replaceChildren(...rows);
  $('no-runs').hidden = state.runs.length > 0;
}

// ---- charts ---------------------------------------------------------------------------

const charts = {};

function lineChart(canvasId, yTitle, logY = false) {
  if (charts[canvasId]) return charts[canvasId];
  charts[canvasId] = new Chart($(canvasId), {
    type: 'line',
    data: {datasets: []},
    options: {
      animation: false, parsing: false, normalized: true, responsive: true,
      maintainAspectRatio: false, spanGaps: true,
      interaction: {mode: 'nearest', intersect: false},
      elements: {point: {radius: 0}, line: {borderWidth: 1.5}},
      scales: {
        x: {type: 'linear', title: {display: true, text: 'step'}},
        y: {type: logY ? 'logarithmic' : 'linear', title: {display: true, text: yTitle}},
      },
      plugins: {legend: {display: true, labels: {boxWidth: 12, font: {size: 11}}},
                decimation: {enabled: false}},
    },
  });
  return charts[canvasId];
}

function points(xs, ys) {
  const out = [];
  for (let i = 0; i < xs.length; i++)
    if (ys[i] !== null && xs[i] !== null) out.push({x: xs[i], y: ys[i]});
  return out;
}

function setData(chart, datasets) {
  const xKey = $('xaxis').value;
  chart.options.scales.x.title.text = xKey === 'step' ? 'step' : 'wall time (s)';
  chart.data.datasets = datasets;
  chart.update('none');
}

// A run's name for legends and titles: without the folder all listed runs share.
function nameOf(id) {
  const r = state.runs.find((x) => x.id === id);
  if (!r) return id;
  const first = (n) => n.split('/')[0];
  const shared = state.runs.length > 0 && state.runs.every((x) => x.name.includes('/') &&
                                                           first(x.name) === first(state.runs[0].name));
  return shared ? r.name.slice(first(r.name).length + 1) : r.name;
}

function renderCharts() {
  const x = $('xaxis').value;
  const loss = [], lr = [], dropped = [], speed = [];
  for (const id of state.ticked) {
    const s = state.series.get(id);
    if (!s) continue;
    const c = colorOf(id), n = nameOf(id);
    loss.push({label: `${n} train`, data: points(s.train[x], s.train.loss), borderColor: c,
               backgroundColor: c});
    loss.push({label: `${n} val`, data: points(s.eval[x], s.eval.val_loss), borderColor: c,
               backgroundColor: c, borderDash: [4, 3], pointRadius: 2.5, showLine: true});
    lr.push({label: n, data: points(s.train[x], s.train.lr), borderColor: c, backgroundColor: c});
    dropped.push({label: n, data: points(s.train[x], s.train.drop_frac), borderColor: c,
                  backgroundColor: c});
    speed.push({label: n, data: points(s.train[x], s.train.tokens_per_s), borderColor: c,
                backgroundColor: c});
  }
  setData(lineChart('chart-loss', 'loss'), loss);
  setData(lineChart('chart-lr', 'learning rate'), lr);
  setData(lineChart('chart-dropped', 'dropped fraction'), dropped);
  setData(lineChart('chart-speed', 'tokens / s'), speed);
}

// ---- expert-load heatmaps ---------------------------------------------------------------

// viridis, five stops
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colormap(t) {
  t = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(t)), f = t - i;
  return STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f));
}

function drawHeatmap(canvas, layer) {
  const cols = layer.load.length, rows = layer.experts;
  let vmax = 0;
  for (const col of layer.load) for (const v of col) if (v !== null && v > vmax) vmax = v;
  vmax = vmax || 1;
  canvas.width = Math.max(1, cols);
  canvas.height = rows;
  canvas.style.height = `${Math.min(240, Math.max(60, rows * 6))}px`;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(canvas.width, canvas.height);
  for (let c = 0; c < cols; c++)
    for (let e = 0; e < rows; e++) {
      const v = layer.load[c][e];
      const [r, g, b] = v === null ? [240, 240, 240] : colormap(v / vmax);
      const o = (e * cols + c) * 4;
      img.data[o] = r; img.data[o + 1] = g; img.data[o + 2] = b; img.data[o + 3] = 255;
    }
  ctx.putImageData(img, 0, 0);
  return vmax;
}

function legend(vmax) {
  const c = el('canvas', {width: 120, height: 1});
  const ctx = c.getContext('2d');
  for (let i = 0; i < 120; i++) {
    const [r, g, b] = colormap(i / 119);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(i, 0, 1, 1);
  }
  return el('div', {class: 'legend'}, ['0', c, `${(vmax * 100).toFixed(1)}% of tokens`]);
}

function renderHeatmaps() {
  const x = $('xaxis').value;
  $('tooltip').hidden = true;  // its canvas is about to be replaced
  const boxes = [];
  for (const id of state.ticked) {
    const s = state.series.get(id);
    if (!s) continue;
    for (const layer of s.layers) {
      if (!layer.load.length) continue;
      const canvas = el('canvas', {'data-run': id, 'data-layer': layer.layer});
      const vmax = drawHeatmap(canvas, layer);
      const xs = layer[x];
      const first = x === 'step' ? fmt.int(xs[0]) : fmt.secs(xs[0]);
      const last = x === 'step' ? fmt.int(xs[xs.length - 1]) : fmt.secs(xs[xs.length - 1]);
      canvas.addEventListener('mousemove', (ev) => showCell(ev, canvas, layer, x));
      canvas.addEventListener('mouseleave', () => { $('tooltip').hidden = true; });
      boxes.push(el('div', {class: 'heatmap'}, [
        el('h3', {text: `${nameOf(id)} · block ${layer.layer} · ${layer.experts} experts`}),
        canvas,
        el('div', {class: 'axis'}, [el('span', {text: first}),
                                    el('span', {text: x === 'step' ? 'step' : 'wall time'}),
                                    el('span', {text: last})]),
        legend(vmax),
      ]));
    }
  }
  $('heatmaps').replaceChildren(...boxes);
}

function showCell(ev, canvas, layer, x) {
  const rect = canvas.getBoundingClientRect();
  const c = Math.floor((ev.clientX - rect.left) / rect.width * layer.load.length);
  const e = Math.floor((ev.clientY - rect.top) / rect.height * layer.experts);
  if (c < 0 || c >= layer.load.length || e < 0 || e >= layer.experts) return;
  const v = layer.load[c][e];
  const tip = $('tooltip');
  const at = x === 'step' ? `step ${fmt.int(layer.step[c])}` : fmt.secs(layer.time_s[c]);
  tip.textContent = `${at} · expert ${e}: ${v === null ? '–' : (v * 100).toFixed(1) + '%'}` +
                    ` (even: ${(100 / layer.experts).toFixed(1)}%)`;
  tip.style.left = `${ev.clientX + 12}px`;
  tip.style.top = `${ev.clientY + 12}px`;
  tip.hidden = false;
}

// ---- sweeps ---------------------------------------------------------------------------

const SWEEP_COLS = [
  ['point', (r, s) => r.id.slice(s.id.length + 1)],
  ['status', (r) => r.status],
  ['step', (r) => r.step],
  ['best val', (r) => r.best_val],
  ['val', (r) => r.last_val],
  ['val @ equal time', (r, s, sum) => sum.val_at_equal_time ?? null],
  ['dropped %', (r, s, sum) => (sum.drop_frac == null ? null : 100 * sum.drop_frac)],
  ['load CV', (r, s, sum) => sum.load_cv ?? null],
  ['tokens/s', (r) => r.tokens_per_s],
  ['wall s', (r) => r.wall_s],
];

function sweepTable(sweep) {
  const sort = state.sort.get(sweep.id) || {key: 'best val', desc: false};
  const cols = [...SWEEP_COLS, ...sweep.keys.map((k) => [k, (r) => (sweep.overrides[r.id] || {})[k]])];
  const runs = sweep.points.map((id) => state.runs.find((r) => r.id === id)).filter(Boolean);
  const rows = runs.map((r) => {
    const point = r.id.slice(sweep.id.length + 1);
    const sum = sweep.summary[point] || {};
    return {run: r, cells: cols.map(([, f]) => f(r, sweep, sum))};
  });
  const k = cols.findIndex(([name]) => name === sort.key);
  if (k >= 0) {
    rows.sort((a, b) => {
      const x = a.cells[k], y = b.cells[k];
      if (x == null && y == null) return 0;
      if (x == null) return 1;  // absent values last, either way
      if (y == null) return -1;
      const d = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
      return sort.desc ? -d : d;
    });
  }
  const head = el('tr', {}, cols.map(([name], i) => {
    const th = el('th', {text: name, class: `sortable ${i === 0 || i >= SWEEP_COLS.length ? 'name' : ''}` +
                                         (name === sort.key ? (sort.desc ? ' sorted-desc' : ' sorted-asc') : '')});
    th.addEventListener('click', () => {
      state.sort.set(sweep.id, {key: name, desc: name === sort.key ? !sort.desc : false});
      renderSweeps();
    });
    return th;
  }));
  const body = rows.map(({run, cells}) => el('tr', {'data-id': run.id}, cells.map((v, i) => {
    if (i === 1) return el('td', {}, [el('span', {class: `status ${v}`, text: v})]);
    const override = i >= SWEEP_COLS.length;
    const text = override || typeof v !== 'number' ? fmt.value(v)
                 : i === 2 || i >= 8 ? fmt.int(v) : fmt.num(v, i === 6 ? 2 : 4);
    return el('td', {class: i === 0 ? 'name' : override ? 'key' : '', text});
  })));
  return el('div', {class: 'scroll'}, [el('table', {class: 'sweep-table'}, [el('thead', {}, [head]),
                                                                             el('tbody', {}, body)])]);
}

function renderSweeps() {
  const x = $('xaxis').value;
  const live = new Set(state.sweeps.map((s) => s.id));
  for (const key of Object.keys(charts))
    if (key.startsWith('sweep:') && !live.has(key.slice(6))) {
      charts[key].destroy();
      delete charts[key];
    }
  const boxes = state.sweeps.map((sweep) => {
    let box = document.querySelector(`.sweep[data-id="${CSS.escape(sweep.id)}"]`);
    if (!box) {
      const canvas = el('canvas');
      box = el('div', {class: 'sweep', 'data-id': sweep.id}, [
        el('h2', {text: `Sweep ${sweep.name}`}), el('div', {class: 'table'}),
        el('div', {class: 'chart'}, [el('h3', {text: 'val loss, every point'}), canvas])]);
      charts[`sweep:${sweep.id}`] = new Chart(canvas, {
        type: 'line', data: {datasets: []},
        options: {animation: false, parsing: false, responsive: true, maintainAspectRatio: false,
                  elements: {point: {radius: 2}, line: {borderWidth: 1.5}},
                  scales: {x: {type: 'linear', title: {display: true, text: 'step'}},
                           y: {title: {display: true, text: 'val loss'}}},
                  plugins: {legend: {labels: {boxWidth: 12, font: {size: 11}}}}},
      });
    }
    box.querySelector('.table').replaceChildren(sweepTable(sweep));
    const curves = state.sweepCurves.get(sweep.id);
    if (curves) {
      const chart = charts[`sweep:${sweep.id}`];
      setData(chart, curves.points.map((p, i) => ({
        label: p.name, data: points(p.eval[x], p.eval.val_loss),
        borderColor: PALETTE[i % PALETTE.length], backgroundColor: PALETTE[i % PALETTE.length]})));
    }
    return box;
  });
  $('sweeps').replaceChildren(...boxes);
}

// ---- polling ---------------------------------------------------------------------------

async function refreshSeries() {
  await Promise.all([...state.ticked].map(async (id) => {
    const have = state.series.get(id);
    try {
      const s = await getJSON(`/api/run?id=${encodeURIComponent(id)}&max=${POINTS}` +
                              (have ? `&have=${have.version}` : ''));
      if (!s.unchanged) state.series.set(id, s);
      state.runErrors.delete(id);
    } catch (e) {
      if (e.status === 404) {  // deleted while shown
        state.ticked.delete(id);
        state.series.delete(id);
      } else if (e.status !== undefined) {  // this run's trouble: shown on its row
        state.runErrors.set(id, e.message);
      } else {
        throw e;  // the server is gone: the whole poll failed
      }
    }
  }));
  for (const id of state.series.keys())
    if (!state.ticked.has(id)) state.series.delete(id);
}

async function refreshSweeps() {
  await Promise.all(state.sweeps.map(async (s) => {
    try {
      state.sweepCurves.set(s.id, await getJSON(`/api/sweep?id=${encodeURIComponent(s.id)}&max=500`));
    } catch (e) {
      if (e.status === undefined) throw e;  // the server is gone; a sweep's own trouble is not fatal
    }
  }));
  for (const id of state.sweepCurves.keys())
    if (!state.sweeps.some((s) => s.id === id)) state.sweepCurves.delete(id);
}

function renderAll() {
  renderRuns();
  renderCharts();
  renderHeatmaps();
  renderSweeps();
}

function setLive(ok, text) {
  const live = $('live');
  live.className = `live ${ok ? 'ok' : 'error'}`;
  live.textContent = text;
}

async function poll() {
  try {
    const list = await getJSON('/api/runs');
    state.pollMs = list.poll_ms || state.pollMs;
    state.runs = list.runs;
    state.sweeps = list.sweeps;
    state.diffKeys = list.diff_keys;
    $('roots').textContent = list.roots.join('  ');
    $('runs-note').textContent = `${list.runs.length} run${list.runs.length === 1 ? '' : 's'}` +
                                 (list.truncated ? ' (more not listed: --max-runs)' : '');
    const ids = new Set(list.runs.map((r) => r.id));
    if (state.firstList && list.runs.length) {
      for (const id of defaultTicks(list.runs)) state.ticked.add(id);
      state.firstList = false;
    }
    for (const id of [...state.ticked]) if (!ids.has(id)) state.ticked.delete(id);
    for (const id of [...state.colors.keys()]) if (!ids.has(id)) state.colors.delete(id);
    await refreshSeries();
    await refreshSweeps();
    renderAll();
    setLive(true, `live · ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    window.switchBoard.errors++;
    window.switchBoard.lastError = String(e);
    setLive(false, `not updating: ${e.message}`);
  }
  window.switchBoard.polls++;
  setTimeout(poll, state.pollMs);
}

$('xaxis').addEventListener('change', renderAll);
poll();
