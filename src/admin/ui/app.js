// ficus workbench: a small single-page view over the admin API (/api/*). No framework, no
// external assets. Everything a record holds came from clients and upstreams, so the DOM is
// only ever built with textContent and attributes, never innerHTML.
'use strict';

const TOKEN_KEY = 'ficus.token';
const LIVE_KEY = 'ficus.live';
const REFRESH_MS = 5000;
const SAFE_METHODS = ['GET', 'HEAD', 'OPTIONS', 'TRACE'];
const STATES = ['open', 'acknowledged', 'expected', 'resolved'];
const CLASSES = ['defect', 'expected-change', 'noise', 'legacy-bug', 'test-data'];

// ---- small DOM helpers ------------------------------------------------------------------

/** Builds an element: h('a', {href: '#'}, 'text', child, ...). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const svgNs = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...children) {
  const el = document.createElementNS(svgNs, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  append(el, children);
  return el;
}

const main = () => document.getElementById('main');

function say(text, isError) {
  const s = document.getElementById('status');
  s.textContent = text || '';
  s.classList.toggle('error', Boolean(isError));
}

function pct(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return '-';
  return (x * 100).toFixed(x < 0.001 && x > 0 ? 3 : 2) + '%';
}

function when(rfc3339) {
  if (!rfc3339) return '-';
  const d = new Date(rfc3339);
  if (Number.isNaN(d.getTime())) return rfc3339;
  return d.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
}

function timeEl(rfc3339) {
  return h('time', { datetime: rfc3339 }, when(rfc3339));
}

// ---- the admin API ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
  }
}

async function api(path, opts) {
  const o = opts || {};
  const headers = { Accept: 'application/json' };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  if (o.body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method: o.method || 'GET',
    headers,
    body: o.body === undefined ? undefined : JSON.stringify(o.body),
    cache: 'no-store',
  });
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  if (resp.status === 401) {
    askToken('The admin API needs a token.');
    throw new ApiError(401, body);
  }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? '?' + s : '';
}

// ---- token ------------------------------------------------------------------------------

function askToken(why) {
  const dialog = document.getElementById('token-dialog');
  if (dialog.open) return;
  const input = document.getElementById('token-input');
  input.value = '';
  if (why) say(why, true);
  dialog.showModal();
  input.focus();
}

function setupToken() {
  const dialog = document.getElementById('token-dialog');
  document.getElementById('token-button').addEventListener('click', () => askToken());
  document.getElementById('token-form').addEventListener('submit', () => {
    const v = document.getElementById('token-input').value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v);
    say('');
    render();
  });
  document.getElementById('token-forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    dialog.close();
    say('Token forgotten.');
  });
  document.getElementById('token-cancel').addEventListener('click', () => dialog.close());
}

/** Asks for an explicit confirmation; resolves to true when given. */
function confirmWrite(text) {
  const dialog = document.getElementById('confirm-dialog');
  const check = document.getElementById('confirm-check');
  document.getElementById('confirm-text').textContent = text;
  check.checked = false;
  return new Promise((resolve) => {
    const done = (answer) => {
      dialog.removeEventListener('close', onClose);
      resolve(answer);
    };
    const onClose = () => done(dialog.returnValue === 'yes' && check.checked);
    dialog.addEventListener('close', onClose);
    document.getElementById('confirm-no').onclick = () => dialog.close('no');
    dialog.returnValue = '';
    dialog.showModal();
    check.focus();
  });
}

// ---- routing: the view and its filters live in the hash, so a view is a shareable link ----

function current() {
  const raw = location.hash.replace(/^#/, '') || '/routes';
  const [path, qs] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { view: parts[0] || 'routes', arg: parts[1], params: new URLSearchParams(qs || '') };
}

function go(view, params) {
  location.hash = '#/' + view + query(params || {});
}

let refreshTimer = null;
let rendering = 0;

async function render() {
  const { view, arg, params } = current();
  for (const a of document.querySelectorAll('.top nav a')) {
    if (a.dataset.view === view || (view === 'divergence' && a.dataset.view === 'divergences')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const ticket = ++rendering;
  const views = { routes: routesView, groups: groupsView, divergences: divergencesView, divergence: divergenceView };
  const fn = views[view] || routesView;
  try {
    const node = await fn(arg, params);
    if (ticket !== rendering) return; // a newer render started meanwhile
    const m = main();
    const hadFocus = m.contains(document.activeElement) && document.activeElement !== m;
    m.replaceChildren(node);
    if (!hadFocus && !refreshing) m.focus({ preventScroll: true });
    if (!refreshing) say('');
  } catch (e) {
    if (ticket !== rendering) return;
    if (e instanceof ApiError && e.status === 401) return;
    say('Could not load: ' + e.message, true);
  }
}

let refreshing = false;
function scheduleRefresh() {
  clearInterval(refreshTimer);
  if (!document.getElementById('live').checked) return;
  refreshTimer = setInterval(async () => {
    const { view } = current();
    // A divergence being edited is not refreshed under the user's hands.
    if (view === 'divergence' || document.querySelector('dialog[open]')) return;
    if (main().querySelector('input[type="checkbox"]:checked, input[type="text"]:focus, input[type="datetime-local"]:focus')) return;
    refreshing = true;
    try { await render(); } finally { refreshing = false; }
  }, REFRESH_MS);
}

// ---- routes -----------------------------------------------------------------------------

/** Divergence rate per hour over the last 24 hours, as bars (hours without comparisons stay
 *  empty). Like the Rate column, it leaves out the divergences marked expected. */
function sparkline(history, truncated) {
  const hours = 24;
  const bar = 5;
  const w = hours * bar;
  const hgt = 26;
  const now = Math.floor(Date.now() / 3600000);
  const byHour = new Map((history || []).map((p) => [Math.floor(p.hour_ms / 3600000), p]));
  const points = [];
  for (let i = hours - 1; i >= 0; i--) {
    const p = byHour.get(now - i);
    points.push(p && p.comparisons > 0 ? p : null);
  }
  const counted = (p) => (p.counted === undefined ? p.divergences - (p.expected || 0) : p.counted);
  const rates = points.map((p) => (p ? Math.max(0, counted(p)) / p.comparisons : null));
  const known = rates.filter((r) => r !== null);
  const label = known.length
    ? `Divergence rate per hour over the last 24 hours, not counting those marked expected: latest ${pct(known[known.length - 1])}, highest ${pct(Math.max(...known))}${truncated ? ' (expected records only partly subtracted)' : ''}`
    : 'No comparisons in the last 24 hours';
  const el = svg('svg', { class: 'spark', width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}`, role: 'img', 'aria-label': label },
    svg('title', {}, label),
    svg('line', { x1: 0, y1: hgt - 0.5, x2: w, y2: hgt - 0.5 }));
  const top = Math.max(0.01, ...known);
  rates.forEach((r, i) => {
    if (r === null) return;
    const p = points[i];
    const bh = Math.max(1.5, (r / top) * (hgt - 2));
    const hour = new Date(p.hour_ms).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
    el.append(svg('rect', { x: i * bar + 0.5, y: hgt - 1 - bh, width: bar - 1, height: bh, 'data-counted': counted(p), 'data-comparisons': p.comparisons },
      svg('title', {}, `${hour}: ${counted(p)} of ${p.comparisons} (${pct(r)})${p.expected ? `, ${p.expected} expected not counted` : ''}`)));
  });
  return el;
}

async function routesView() {
  const [report, rules] = await Promise.all([api('/api/report'), api('/api/rules')]);
  const shadow = new Map(rules.routes.map((r) => [r.name, r.shadow]));
  const rows = report.routes.map((r) => {
    const s = shadow.get(r.route);
    const open = (r.divergences.by_state && r.divergences.by_state.open) || 0;
    const authority = [h('span', {}, r.authority)];
    if (r.override && r.override.authority) authority.push(' ', h('span', { class: 'badge not-ready', title: 'emergency override' }, 'override: ' + r.override.authority));
    if (r.override && r.override.shadow === false) authority.push(' ', h('span', { class: 'badge not-ready' }, 'shadow off'));
    return h('tr', { 'data-route': r.route },
      h('th', { scope: 'row' }, h('a', { href: '#/groups' + query({ route: r.route, state: 'open' }) }, r.route)),
      h('td', {}, authority),
      h('td', { class: 'num' }, s ? pct(s.sample) : h('span', { class: 'muted' }, 'off')),
      h('td', { class: 'num' }, String(r.comparisons.window), h('div', { class: 'muted' }, r.comparisons.total + ' total')),
      h('td', { class: 'num' }, String(r.divergences.window)),
      h('td', { class: 'num rate' }, r.comparisons.window ? pct(r.divergence_rate) : '-'),
      h('td', { class: 'num' }, r.comparisons.window ? pct(r.divergence_rate_upper_95) : '-'),
      h('td', { class: 'num' }, open ? h('a', { href: '#/divergences' + query({ route: r.route, state: 'open' }) }, String(open)) : '0'),
      h('td', {}, sparkline(r.history, r.history_truncated)),
      h('td', { class: 'verdict' },
        h('span', { class: 'badge ' + r.verdict }, r.verdict),
        r.reasons.length ? h('ul', { class: 'reasons' }, r.reasons.map((x) => h('li', {}, x))) : null));
  });
  return h('section', { 'aria-labelledby': 'routes-title' },
    h('h1', { id: 'routes-title' }, 'Routes'),
    h('p', { class: 'muted' }, `Rules loaded ${when(rules.loaded_at)} from ${rules.sources.join(', ')}. Rates count divergences over comparisons in each route's gate window, minus those marked expected.`),
    rows.length
      ? h('div', { class: 'scroll' }, h('table', { id: 'routes' },
        h('caption', {}, 'Readiness of the new side, per route'),
        h('thead', {}, h('tr', {},
          ['Route', 'Authority'].map((t) => h('th', { scope: 'col' }, t)),
          ['Shadow', 'Comparisons', 'Divergences', 'Rate', 'Upper 95%', 'Open'].map((t) => h('th', { scope: 'col', class: 'num' }, t)),
          h('th', { scope: 'col' }, 'Last 24 h'),
          h('th', { scope: 'col' }, 'Verdict'))),
        h('tbody', {}, rows)))
      : h('p', { class: 'empty' }, 'No routes in the rules.'));
}

// ---- filters shared by the list views ----------------------------------------------------

async function routeNames() {
  const rules = await api('/api/rules');
  return rules.routes.map((r) => r.name);
}

function select(id, label, options, value, onchange) {
  return h('div', {},
    h('label', { for: id }, label),
    h('select', { id, name: id, onchange },
      options.map(([v, text]) => h('option', { value: v, selected: v === (value || '') }, text))));
}

function filterForm(view, params, fields) {
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Filters', onsubmit: (e) => e.preventDefault() });
  const update = () => {
    const p = {};
    for (const el of form.elements) if (el.name && el.value) p[el.name] = el.value;
    go(view, p);
  };
  for (const f of fields) form.append(f(update));
  return form;
}

const SINCE = { '1h': 3600e3, '24h': 86400e3, '7d': 7 * 86400e3 };
const SINCE_OPTIONS = [['', 'any time'], ['1h', 'last hour'], ['24h', 'last 24 hours'], ['7d', 'last 7 days']];

/** The API's `since` and `until` for the view's `since` preset and `until` instant. */
function timeFilter(since, until) {
  const out = {};
  if (SINCE[since]) out.since = String(Date.now() - SINCE[since]);
  if (until) {
    const ms = /^\d+$/.test(until) ? Number(until) : new Date(until).getTime();
    // Not a time: sent as is, so the API's error names it.
    out.until = Number.isNaN(ms) ? until : String(ms);
  }
  return out;
}

/** `until` is kept in the address as an RFC 3339 instant (a shared link means the same moment
 *  anywhere) and shown in local time; the hidden field carries it to the filters. */
function untilField(until) {
  return (update) => {
    const d = until ? new Date(/^\d+$/.test(until) ? Number(until) : until) : null;
    const local = d && !Number.isNaN(d.getTime())
      ? new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19)
      : '';
    const hidden = h('input', { type: 'hidden', name: 'until', value: until || '' });
    const input = h('input', { type: 'datetime-local', id: 'until', step: 1, value: local, onchange: () => {
      const t = input.value ? new Date(input.value) : null;
      hidden.value = t && !Number.isNaN(t.getTime()) ? t.toISOString() : '';
      update();
    } });
    return h('div', {}, h('label', { for: 'until' }, 'Before (local time)'), input, hidden);
  };
}

function classOptions(cls) {
  return [['', 'any class'], ...CLASSES.map((c) => [c, c]), ...(cls && !CLASSES.includes(cls) ? [[cls, cls]] : [])];
}

// ---- groups -----------------------------------------------------------------------------

async function groupsView(_arg, params) {
  const route = params.get('route') || '';
  const state = params.get('state') || '';
  const cls = params.get('class') || '';
  const since = params.get('since') || '';
  const until = params.get('until') || '';
  const filter = { route, state, class: cls, ...timeFilter(since, until) };
  const [names, data] = await Promise.all([routeNames(), api('/api/groups' + query(filter))]);
  const form = filterForm('groups', params, [
    (u) => select('route', 'Route', [['', 'any route'], ...names.map((n) => [n, n])], route, u),
    (u) => select('state', 'State', [['', 'any state'], ...STATES.map((s) => [s, s])], state, u),
    (u) => select('class', 'Class', classOptions(cls), cls, u),
    (u) => select('since', 'Time', SINCE_OPTIONS, since, u),
    untilField(until),
  ]);

  const rows = data.items.map((g) => h('tr', { 'data-fingerprint': g.fingerprint },
    h('td', {}, h('input', { type: 'checkbox', class: 'pick', value: g.fingerprint, 'aria-label': `Select group ${g.fingerprint} (${g.route})` })),
    h('td', {}, g.route),
    h('td', { class: 'num' }, String(g.count)),
    h('td', {}, timeEl(g.first_seen)),
    h('td', {}, timeEl(g.last_seen)),
    h('td', { class: 'paths' }, g.paths.length ? g.paths.map((p) => h('code', {}, p)) : h('span', { class: 'muted' }, '-')),
    h('td', {}, Object.entries(g.states).map(([s, n]) => h('span', { class: 'badge state ' + s }, `${s} ${n}`)), ' ',
      g.marked_expected
        ? h('span', { class: 'muted', title: `Marked by ${g.marked_expected.who} at ${g.marked_expected.at}; another state lifts it` }, 'new records: expected')
        : null),
    h('td', {}, Object.entries(g.classes).map(([c, n]) => h('span', { class: 'badge state' }, `${c} ${n}`))),
    h('td', {},
      h('a', { href: '#/divergence/' + encodeURIComponent(g.example), 'aria-label': `Open the newest divergence of group ${g.fingerprint}` }, 'newest'),
      ' · ',
      h('a', { href: '#/divergences' + query({ fingerprint: g.fingerprint }) }, 'all'))));

  const picked = () => [...main().querySelectorAll('input.pick:checked')].map((c) => c.value);
  const classInput = h('input', { type: 'text', id: 'bulk-class', list: 'classes', placeholder: 'e.g. defect' });
  const bulk = async (what, action) => {
    const fps = picked();
    if (!fps.length) { say('Select one or more groups first.', true); return; }
    let n = 0;
    try {
      for (const fp of fps) {
        const r = await action(fp);
        n += r.updated || 0;
      }
      await render();
      say(`${what}: ${n} record(s) in ${fps.length} group(s).`);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) say(what + ' failed: ' + e.message, true);
    }
  };
  // Changes apply to the group's records the view shows (state, class, time), not to every one.
  const scope = { state, class: cls, ...timeFilter(since, until) };
  const patch = (body) => (fp) => api('/api/groups/' + encodeURIComponent(fp) + query(scope), { method: 'PATCH', body });

  // Replay: the records the view shows (the API's default is every one not resolved).
  // A group's fingerprint ignores the method, so its methods say whether a replay writes.
  const replayGroups = async () => {
    const fps = picked();
    if (!fps.length) { say('Select one or more groups first.', true); return; }
    const byFp = new Map(data.items.map((g) => [g.fingerprint, g]));
    const writes = [...new Set(fps.flatMap((fp) => Object.keys((byFp.get(fp) || {}).methods || {})))]
      .filter((m) => !SAFE_METHODS.includes(m.toUpperCase()));
    let allow = false;
    if (writes.length) {
      allow = await confirmWrite(`The selected groups hold ${writes.join(', ')} requests, which are not safe: replaying them sends each write to legacy and to new again.`);
      if (!allow) { say('Replay cancelled.'); return; }
    }
    say('Replaying…');
    const t = { replayed: 0, matched: 0, unconfirmed: 0, still_diverged: 0, failed: 0, failed_after_sending: 0, skipped_writes: 0 };
    const reasons = new Set();
    try {
      for (const fp of fps) {
        const r = await api('/api/groups/' + encodeURIComponent(fp) + '/replay' + query({ sample: 5, ...scope, allow_writes: allow ? 'true' : '' }), { method: 'POST' });
        for (const k of Object.keys(t)) t[k] += r[k] || 0;
        for (const x of r.results) if (x.outcome === 'failed') reasons.add(x.message);
      }
      await render();
      const parts = [`${t.matched} matched`, `${t.still_diverged} still diverge`];
      if (t.unconfirmed) parts.push(`${t.unconfirmed} matched on an answer legacy did not give the recorded request (left as they were)`);
      if (t.failed) parts.push(`${t.failed} failed (${[...reasons].join('; ')})`);
      if (t.failed_after_sending) parts.push(`${t.failed_after_sending} of those after a request went out: replaying them again repeats it`);
      if (t.skipped_writes) parts.push(`${t.skipped_writes} write(s) skipped`);
      say(t.replayed + t.failed + t.skipped_writes
        ? `Replayed ${t.replayed} record(s) in ${fps.length} group(s): ${parts.join(', ')}.`
        : 'Nothing to replay: no record of the selected group(s) in this state.', t.failed > 0);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) say('Replay failed: ' + e.message, true);
    }
  };
  const actions = h('div', { class: 'bulk', role: 'group', 'aria-label': 'Actions on the selected groups' },
    h('div', {}, h('label', { for: 'bulk-class' }, 'Class'), classInput,
      h('datalist', { id: 'classes' }, CLASSES.map((c) => h('option', { value: c })))),
    h('button', { type: 'button', id: 'bulk-classify', onclick: () => {
      const c = classInput.value.trim();
      if (!c) { say('Type a class first.', true); classInput.focus(); return; }
      bulk('Classified as ' + c, patch({ class: c }));
    } }, 'Classify'),
    h('button', { type: 'button', id: 'bulk-expected', onclick: () => bulk('Marked expected (their later records too, until another state is set)', patch({ state: 'expected' })) }, 'Mark expected'),
    h('button', { type: 'button', id: 'bulk-ack', onclick: () => bulk('Acknowledged', patch({ state: 'acknowledged' })) }, 'Acknowledge'),
    h('button', { type: 'button', id: 'bulk-replay', onclick: replayGroups }, 'Replay 5 of each'));

  const all = h('input', { type: 'checkbox', 'aria-label': 'Select every group', onchange: (e) => {
    for (const c of main().querySelectorAll('input.pick')) c.checked = e.target.checked;
  } });
  return h('section', { 'aria-labelledby': 'groups-title' },
    h('h1', { id: 'groups-title' }, 'Divergence groups'),
    h('p', { class: 'muted' }, 'Divergences with the same route, status pair and differing paths share a fingerprint: usually one root cause.'),
    form,
    data.items.length ? actions : null,
    data.truncated ? h('p', { class: 'muted' }, 'Only the newest 10,000 records were grouped.') : null,
    data.items.length
      ? h('div', { class: 'scroll' }, h('table', { id: 'groups' },
        h('thead', {}, h('tr', {},
          h('th', { scope: 'col' }, all),
          ['Route'].map((t) => h('th', { scope: 'col' }, t)),
          h('th', { scope: 'col', class: 'num' }, 'Count'),
          ['First seen', 'Last seen', 'Differing paths', 'States', 'Classes', 'Records'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, rows)))
      : h('p', { class: 'empty' }, 'No divergences match these filters.'));
}

// ---- divergence list ----------------------------------------------------------------------

/** One page of divergences that has records, unless the end comes first: on Redis a page
 *  reads a bounded number of index entries, so a selective filter can answer empty pages
 *  with a cursor before its matches (only `next: null` is the end). Bounded, so that a
 *  filter matching nothing in a large store does not keep the page loading. */
async function listPage(filter, cursor) {
  let page = await api('/api/divergences' + query({ ...filter, cursor }));
  for (let hops = 0; !page.items.length && page.next && hops < 20; hops++) {
    page = await api('/api/divergences' + query({ ...filter, cursor: page.next }));
  }
  return page;
}

async function divergencesView(_arg, params) {
  const route = params.get('route') || '';
  const state = params.get('state') || '';
  const cls = params.get('class') || '';
  const since = params.get('since') || '';
  const until = params.get('until') || '';
  const fingerprint = params.get('fingerprint') || '';
  const names = await routeNames();
  const filter = { route, state, class: cls, fingerprint, limit: 50, ...timeFilter(since, until) };
  const page = await listPage(filter);
  const form = filterForm('divergences', params, [
    (u) => select('route', 'Route', [['', 'any route'], ...names.map((n) => [n, n])], route, u),
    (u) => select('state', 'State', [['', 'any state'], ...STATES.map((s) => [s, s])], state, u),
    (u) => select('class', 'Class', classOptions(cls), cls, u),
    (u) => select('since', 'Time', SINCE_OPTIONS, since, u),
    untilField(until),
  ]);
  if (fingerprint) form.append(h('input', { type: 'hidden', name: 'fingerprint', value: fingerprint }),
    h('p', {}, 'Group ', h('code', {}, fingerprint), ' ', h('a', { href: '#/divergences' + query({ route, state, class: cls, since, until }) }, 'show all groups')));

  const tbody = h('tbody', {});
  const addRows = (items) => {
    for (const r of items) {
      const url = r.request.path + (r.request.query ? '?' + r.request.query : '');
      tbody.append(h('tr', { 'data-id': r.id },
        h('td', {}, timeEl(r.at)),
        h('td', {}, r.route),
        h('td', {}, h('a', { href: '#/divergence/' + encodeURIComponent(r.id) }, h('span', { class: 'mono' }, r.request.method + ' ' + url))),
        h('td', { class: 'num' }, `${r.legacy.status} → ${r.new.status}`),
        h('td', { class: 'paths' }, r.paths.map((p) => h('code', {}, p))),
        h('td', {}, h('span', { class: 'badge state ' + r.state }, r.state)),
        h('td', {}, r.class || h('span', { class: 'muted' }, '-'))));
    }
  };
  addRows(page.items);
  let next = page.next;
  const more = h('button', { type: 'button', id: 'more', onclick: async () => {
    const p = await listPage(filter, next);
    addRows(p.items);
    next = p.next;
    if (!next) more.remove();
  } }, 'Load more');
  return h('section', { 'aria-labelledby': 'div-title' },
    h('h1', { id: 'div-title' }, 'Divergences'),
    form,
    page.items.length || next
      ? h('div', { class: 'scroll' }, h('table', { id: 'divergences' },
        h('thead', {}, h('tr', {}, ['When', 'Route', 'Request', 'Status', 'Differing paths', 'State', 'Class'].map((t) => h('th', { scope: 'col', class: t === 'Status' ? 'num' : null }, t)))),
        tbody))
      : h('p', { class: 'empty' }, 'No divergences match these filters.'),
    next ? more : null);
}

// ---- one divergence -----------------------------------------------------------------------

/** RFC 6901: one reference token. */
function token(key) {
  return String(key).replace(/~/g, '~0').replace(/\//g, '~1');
}

/** Which body paths to mark on one side: path -> kind. */
function marksFor(record, side) {
  const marks = new Map();
  const put = (diffs, noisy) => {
    for (const d of diffs || []) {
      if (d.in !== 'body' || !d.op) continue;
      let kind = d.op === 'replace' ? 'changed' : d.op === 'add' ? 'added' : 'removed';
      if ((kind === 'added' && side === 'legacy') || (kind === 'removed' && side === 'new')) continue;
      if (noisy) kind = 'noisy';
      marks.set(d.path, kind);
    }
  };
  put(record.noisy_diffs, true);
  put(record.diffs, false);
  return marks;
}

/** Pretty-prints a JSON value as text nodes, wrapping each marked path (key and value) in a
 *  highlighted element that names the path. */
function jsonTree(value, marks) {
  const out = h('pre', { class: 'body json' });
  const markFor = (path, parent) => {
    const kind = marks.get(path);
    if (!kind) return parent;
    const m = h('mark', { class: 'mark ' + kind, 'data-path': path, title: `${kind}: ${path}` });
    parent.append(m);
    return m;
  };
  const walk = (v, path, indent, target) => {
    if (Array.isArray(v) || (v && typeof v === 'object')) {
      const isArr = Array.isArray(v);
      const entries = isArr ? v.map((x, i) => [i, x]) : Object.entries(v);
      if (!entries.length) { target.append(isArr ? '[]' : '{}'); return; }
      target.append(isArr ? '[\n' : '{\n');
      entries.forEach(([k, x], i) => {
        const child = path + '/' + token(k);
        target.append(' '.repeat(indent + 2));
        const holder = markFor(child, target);
        if (!isArr) holder.append(JSON.stringify(String(k)) + ': ');
        walk(x, child, indent + 2, holder);
        target.append(i < entries.length - 1 ? ',\n' : '\n');
      });
      target.append(' '.repeat(indent) + (isArr ? ']' : '}'));
    } else {
      target.append(JSON.stringify(v));
    }
  };
  walk(value, '', 0, markFor('', out));
  return out;
}

function bodyView(recorded, marks, label) {
  if (recorded.body === null || recorded.body === undefined) {
    return h('p', { class: 'muted' }, recorded.body_len ? `${recorded.body_len} bytes, not text: not kept.` : 'No body.');
  }
  const note = recorded.body_truncated ? h('p', { class: 'muted' }, `Cut at the record limit: first part of ${recorded.body_len} bytes.`) : null;
  try {
    if (!recorded.body_truncated && recorded.body.trim()) {
      const tree = jsonTree(JSON.parse(recorded.body), marks);
      tree.setAttribute('aria-label', label);
      return tree;
    }
  } catch (_) { /* not JSON: shown as text */ }
  return h('div', {}, note, h('pre', { class: 'body', 'aria-label': label }, recorded.body));
}

function headerTable(headers, differing, caption) {
  if (!headers.length) return h('p', { class: 'muted' }, 'No headers.');
  return h('table', { class: 'headers' },
    h('caption', { class: 'sr' }, caption),
    h('tbody', {}, headers.map(([n, v]) => h('tr', { class: differing.has(n.toLowerCase()) ? 'hdr-diff' : null },
      h('th', { scope: 'row', class: 'mono' }, (differing.has(n.toLowerCase()) ? '~ ' : '') + n),
      h('td', { class: 'mono' }, v)))));
}

function describe(d) {
  const v = (x) => (x === undefined ? '' : JSON.stringify(x));
  if (d.in === 'status') return [h('strong', {}, 'status '), `${d.old} → ${d.value}`];
  if (d.in === 'header') return [h('strong', {}, 'header '), h('code', {}, d.path), `: ${v(d.old)} → ${v(d.value)}`];
  if (d.op === 'replace') return [h('strong', {}, 'changed '), h('code', {}, d.path), `: ${v(d.old)} → ${v(d.value)}`];
  if (d.op === 'add') return [h('strong', {}, 'added '), h('code', {}, d.path), `: ${v(d.value)}`];
  if (d.op === 'remove') return [h('strong', {}, 'removed '), h('code', {}, d.path), `: was ${v(d.old)}`];
  if (d.kind === 'text') return [h('strong', {}, 'text body differs'), h('pre', { class: 'textdiff' }, d.diff)];
  if (d.kind === 'binary') return [h('strong', {}, 'binary body differs: '), `${d.old.len} bytes (sha256 ${d.old.sha256.slice(0, 12)}…) → ${d.value.len} bytes (sha256 ${d.value.sha256.slice(0, 12)}…)`];
  if (d.kind === 'malformed_json') return [h('strong', {}, `malformed JSON on the ${d.side} side: `), d.error];
  if (d.kind === 'content_type') return [h('strong', {}, 'body kinds differ: '), `${d.old} → ${d.value}`];
  return [h('strong', {}, d.kind || 'difference'), ' ', JSON.stringify(d)];
}

/** POSIX single quotes: nothing inside is special to the shell; a quote becomes '\''. */
function shellQuote(s) {
  return "'" + String(s).replace(/'/g, "'\\''") + "'";
}

/** A curl command that sends the recorded request again, through ficus. Every recorded part
 *  (method, URL with the recorded Host, headers, body) came from a client, so every one is
 *  quoted; --globoff keeps curl from expanding [] and {} in the path. */
function curlCommand(r) {
  const q = shellQuote;
  const host = (r.request.headers.find(([n]) => n.toLowerCase() === 'host') || [])[1] || location.hostname;
  const url = 'http://' + host + r.request.path + (r.request.query ? '?' + r.request.query : '');
  const parts = ['curl', '-sS', '--globoff', '-X', q(r.request.method), q(url)];
  const skip = ['host', 'content-length', 'connection', 'transfer-encoding'];
  for (const [n, v] of r.request.headers) {
    if (skip.includes(n.toLowerCase()) || v === '[redacted]') continue;
    parts.push('-H', q(n + ': ' + v));
  }
  if (r.request.body) parts.push('--data-raw', q(r.request.body));
  return parts.join(' ');
}

function sideColumn(r, side) {
  const resp = r[side];
  const diffs = r.diffs || [];
  const statusDiffers = diffs.some((d) => d.in === 'status');
  const differing = new Set(diffs.filter((d) => d.in === 'header').map((d) => d.path));
  const role = r.authority === side ? 'authority: the client got this' : 'shadow';
  return h('section', { class: 'panel side', 'data-side': side, 'aria-labelledby': 'side-' + side },
    h('h2', { id: 'side-' + side }, side === 'legacy' ? 'Legacy' : 'New', ' ', h('span', { class: 'muted' }, `(${role})`)),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Status'), h('dd', {}, statusDiffers ? h('mark', { class: 'mark changed' }, String(resp.status)) : String(resp.status)),
      h('dt', {}, 'Latency'), h('dd', {}, resp.latency_ms.toFixed(1) + ' ms'),
      h('dt', {}, 'Body'), h('dd', {}, resp.body_len + ' bytes')),
    h('h3', {}, 'Headers'),
    headerTable(resp.headers, differing, side + ' headers'),
    h('h3', {}, 'Body'),
    bodyView(resp, marksFor(r, side), side + ' body'));
}

async function divergenceView(id) {
  const r = await api('/api/divergences/' + encodeURIComponent(id));
  const url = r.request.path + (r.request.query ? '?' + r.request.query : '');
  const safe = SAFE_METHODS.includes(r.request.method.toUpperCase());

  const stateSel = h('select', { id: 'edit-state' }, STATES.map((s) => h('option', { value: s, selected: s === r.state }, s)));
  const classIn = h('input', { type: 'text', id: 'edit-class', list: 'classes-d', value: r.class || '' });
  const noteIn = h('textarea', { id: 'edit-note', rows: 1 }, r.note || '');
  const save = async () => {
    const body = {};
    if (stateSel.value !== r.state) body.state = stateSel.value;
    if (classIn.value.trim() !== (r.class || '')) body.class = classIn.value.trim() || null;
    if (noteIn.value !== (r.note || '')) body.note = noteIn.value || null;
    if (!Object.keys(body).length) { say('Nothing changed.'); return; }
    try {
      await api('/api/divergences/' + encodeURIComponent(r.id), { method: 'PATCH', body });
      await render();
      say('Saved.');
    } catch (e) { if (e.status !== 401) say('Save failed: ' + e.message, true); }
  };
  const replay = async () => {
    let allow = false;
    if (!safe) {
      allow = await confirmWrite(`${r.request.method} is not a safe method: replaying it sends the write to legacy and to new again.`);
      if (!allow) { say('Replay cancelled.'); return; }
    }
    say('Replaying…');
    try {
      const out = await api('/api/divergences/' + encodeURIComponent(r.id) + '/replay' + (allow ? '?allow_writes=true' : ''), { method: 'POST' });
      await render();
      let msg = `Replay still diverges (${out.diffs.length} difference(s)).`;
      if (out.match && out.unconfirmed) msg = `Replay matched, but ${out.unconfirmed}; the divergence stays ${out.record.state}.`;
      else if (out.match && out.record.state === 'resolved') msg = 'Replay matched: the divergence is resolved.';
      else if (out.match) msg = `Replay matched; the divergence stays ${out.record.state}.`;
      say(msg);
    } catch (e) { if (e.status !== 401) say('Replay failed: ' + e.message, true); }
  };
  const curl = curlCommand(r);
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(curl);
      say('curl command copied.');
    } catch (_) {
      document.getElementById('curl').open = true;
      say('Copy the command below (the clipboard is not available here).');
    }
  };

  return h('article', { 'aria-labelledby': 'rec-title', 'data-id': r.id },
    h('p', {}, h('a', { href: '#/groups' + query({ route: r.route }) }, '← groups of ' + r.route), ' · ',
      h('a', { href: '#/divergences' + query({ fingerprint: r.fingerprint }) }, 'same fingerprint')),
    h('h1', { id: 'rec-title' }, h('span', { class: 'mono' }, r.request.method + ' ' + url), ' ',
      h('span', { class: 'badge state ' + r.state, id: 'rec-state' }, r.state),
      r.class ? [' ', h('span', { class: 'badge state', id: 'rec-class' }, r.class)] : null),
    h('p', { class: 'muted' }, `Route ${r.route} · ${when(r.at)} · authority ${r.authority} · request id `, h('code', {}, r.request_id), ` · replica ${r.instance}`),
    h('section', { class: 'panel', 'aria-labelledby': 'diffs-title' },
      h('h2', { id: 'diffs-title' }, `Differences (${r.diffs.length})`),
      h('ul', { class: 'diffs' }, r.diffs.map((d) => h('li', {}, describe(d)))),
      r.noisy_diffs && r.noisy_diffs.length
        ? [h('h3', {}, 'Noisy fields (learned, not counted)'), h('ul', { class: 'diffs' }, r.noisy_diffs.map((d) => h('li', {}, describe(d))))]
        : null),
    h('section', { class: 'panel', 'aria-labelledby': 'act-title' },
      h('h2', { id: 'act-title' }, 'Work on it'),
      h('div', { class: 'bulk' },
        h('div', {}, h('label', { for: 'edit-state' }, 'State'), stateSel),
        h('div', {}, h('label', { for: 'edit-class' }, 'Class'), classIn, h('datalist', { id: 'classes-d' }, CLASSES.map((c) => h('option', { value: c })))),
        h('div', { class: 'grow' }, h('label', { for: 'edit-note' }, 'Note'), noteIn),
        h('button', { type: 'button', class: 'primary', id: 'save', onclick: save }, 'Save'),
        h('button', { type: 'button', id: 'replay', onclick: replay }, safe ? 'Replay now' : 'Replay (write)…'),
        h('button', { type: 'button', id: 'copy-curl', onclick: copy }, 'Copy curl')),
      h('details', { id: 'curl' }, h('summary', {}, 'curl command'), h('pre', { class: 'body' }, curl))),
    h('div', { class: 'grid2' }, sideColumn(r, 'legacy'), sideColumn(r, 'new')),
    h('section', { class: 'panel', 'aria-labelledby': 'req-title' },
      h('h2', { id: 'req-title' }, 'Request'),
      h('p', { class: 'mono' }, r.request.method + ' ' + url),
      headerTable(r.request.headers, new Set(), 'request headers'),
      bodyView(r.request, new Map(), 'request body')),
    h('section', { class: 'panel', 'aria-labelledby': 'hist-title' },
      h('h2', { id: 'hist-title' }, 'History'),
      r.history && r.history.length
        ? h('ol', { class: 'history' }, r.history.map((c) => h('li', {}, timeEl(c.at), ` ${c.who}: `, h('code', {}, JSON.stringify(c.what)))))
        : h('p', { class: 'muted' }, 'No changes yet.')));
}

// ---- start --------------------------------------------------------------------------------

function start() {
  setupToken();
  const live = document.getElementById('live');
  live.checked = sessionStorage.getItem(LIVE_KEY) === '1';
  live.addEventListener('change', () => {
    sessionStorage.setItem(LIVE_KEY, live.checked ? '1' : '0');
    scheduleRefresh();
  });
  window.addEventListener('hashchange', render);
  scheduleRefresh();
  render();
}

document.addEventListener('DOMContentLoaded', start);
