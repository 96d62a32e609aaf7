//! The JSON body diff: walks the legacy and new documents together and emits RFC 6902
//! operations (`add`, `remove`, `replace`) that, applied in order to the legacy document, give
//! the new one outside ignored paths.
//!
//! Two walks share the rules: `diff` emits operations, `eq` only answers "would `diff` emit
//! nothing here?" and is what array alignment compares elements with. `eq` may say "different"
//! when `diff` would in fact stay silent (that only costs a less minimal diff), never the
//! reverse (that would lose a difference), so elements `eq` calls equal are not walked again.
//!
//! Paths inside ordered arrays are positions in the document as patched so far, which are the
//! new document's indices for `add` and for changes inside an element; `remove`s of a run come
//! from the highest position down. In `unordered` arrays, changes inside elements come first and
//! name legacy indices; removals follow, then additions appended at the end, so the patched
//! array equals the new one up to element order. Ignore rules with a literal index are checked
//! against these same indices.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};

use super::PatchOp;
use super::myers;
use super::pattern::{Pattern, Seg, render};

/// How deep the walk recurses. serde_json refuses documents nested deeper than 128 levels, so
/// parsed bodies never reach it; past it, subtrees are compared whole.
pub(crate) const MAX_DEPTH: usize = 128;

/// The work one comparison may spend searching for equal elements (element comparisons, and
/// steps of the unordered pairing search), whatever the documents' shape: arrays nested in
/// arrays multiply their searches, and a comparison runs on a thread that has other work.
/// Past it, elements not yet paired are treated as changed: still a correct patch, only a
/// longer one. Documents with a few thousand elements per array never get near it.
pub(crate) const WORK_BUDGET: usize = 4_000_000;

/// The compiled body rules of a comparator.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rules {
    /// Ignore patterns, each extended to what lies beneath.
    pub ignore: Vec<Pattern>,
    pub unordered: Vec<Pattern>,
    pub keyed: Vec<(Pattern, String)>,
    pub tolerance: Option<f64>,
}

impl Rules {
    pub(crate) fn ignored(&self, path: &[Seg<'_>]) -> bool {
        self.ignore.iter().any(|p| p.matches(path))
    }

    fn array_mode(&self, path: &[Seg<'_>]) -> ArrayMode<'_> {
        let unordered =
            !self.unordered.is_empty() && self.unordered.iter().any(|p| p.matches(path));
        // The first matching `array_keys` entry wins.
        let key = self
            .keyed
            .iter()
            .find(|(p, _)| p.matches(path))
            .map(|(_, k)| k.as_str());
        ArrayMode { unordered, key }
    }

    fn number_eq(&self, a: &Number, b: &Number) -> bool {
        match (exact_int(a), exact_int(b)) {
            (Some(x), Some(y)) => match self.tolerance {
                None => x == y,
                Some(t) => (x - y).unsigned_abs() as f64 <= t,
            },
            _ => {
                let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
                    return false;
                };
                match self.tolerance {
                    None => x == y,
                    Some(t) => (x - y).abs() <= t,
                }
            }
        }
    }

    /// Equality of two values that are not both objects or both arrays.
    fn scalar_eq(&self, a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Null, Value::Null) => true,
            (Value::Bool(x), Value::Bool(y)) => x == y,
            (Value::String(x), Value::String(y)) => x == y,
            (Value::Number(x), Value::Number(y)) => self.number_eq(x, y),
            _ => false,
        }
    }
}

/// A number as an exact integer, when it is one: integers as parsed, and floats with no
/// fractional part (so `1 == 1.0`) in a range where the subtraction below cannot overflow.
fn exact_int(n: &Number) -> Option<i128> {
    if let Some(i) = n.as_i64() {
        return Some(i.into());
    }
    if let Some(u) = n.as_u64() {
        return Some(u.into());
    }
    let f = n.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 1e30).then_some(f as i128)
}

/// How an array is compared.
#[derive(Debug, Clone, Copy)]
struct ArrayMode<'r> {
    /// As a multiset: order does not matter.
    unordered: bool,
    /// Elements are matched by this field rather than by position or whole value.
    key: Option<&'r str>,
}

/// The identity of an element of a keyed array: its key field's value, numbers by value.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Key<'v> {
    Null,
    Bool(bool),
    Int(i128),
    Float(u64),
    Str(&'v str),
    Other(String),
}

fn key_of<'v>(v: &'v Value, field: &str) -> Option<Key<'v>> {
    let Value::Object(o) = v else {
        return None;
    };
    Some(match o.get(field)? {
        Value::Null => Key::Null,
        Value::Bool(b) => Key::Bool(*b),
        Value::Number(n) => match exact_int(n) {
            Some(i) => Key::Int(i),
            None => Key::Float(n.as_f64().unwrap_or(f64::NAN).to_bits()),
        },
        Value::String(s) => Key::Str(s),
        other => Key::Other(other.to_string()),
    })
}

/// The work budget of a comparison of documents of `bytes` bytes together: in proportion to
/// their size (a walk of two equal documents costs about one unit per value, a value takes
/// several bytes), so that a small comparison, which runs on a proxy worker, stays small
/// whatever the documents' shape; at most [`WORK_BUDGET`].
pub(crate) fn budget_for(bytes: usize) -> usize {
    bytes.saturating_mul(8).clamp(50_000, WORK_BUDGET)
}

/// What [`diff`] found and spent.
pub(crate) struct Diffed {
    pub ops: Vec<PatchOp>,
    /// Work spent, at most the budget (what the tests of the budget read).
    #[cfg_attr(not(test), allow(dead_code))]
    pub spent: usize,
    /// The budget ran out: elements not paired by then are reported as changed, so the
    /// operations are a correct patch but may not be the shortest one.
    pub exhausted: bool,
}

/// The operations turning `legacy` into `new` under `rules`, spending at most `budget`.
pub(crate) fn diff(rules: &Rules, legacy: &Value, new: &Value, budget: usize) -> Diffed {
    let mut walker = Walker {
        rules,
        path: Vec::new(),
        out: Vec::new(),
        work: budget,
    };
    walker.diff(legacy, new, 0);
    Diffed {
        ops: walker.out,
        spent: budget - walker.work,
        exhausted: walker.work == 0,
    }
}

/// A hash of a value under which values that are equal element for element (object keys in
/// any order, numbers by value as [`Rules::number_eq`] without tolerance compares them) hash
/// the same. Unordered arrays use it to pair equal elements without a quadratic search;
/// every pairing it proposes is confirmed by a real comparison.
fn value_hash(v: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    fn feed(v: &Value, h: &mut std::hash::DefaultHasher) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => match exact_int(n) {
                Some(i) => (2u8, i).hash(h),
                None => (3u8, n.as_f64().unwrap_or(f64::NAN).to_bits()).hash(h),
            },
            Value::String(s) => (4u8, s).hash(h),
            Value::Array(a) => {
                (5u8, a.len()).hash(h);
                for e in a {
                    feed(e, h);
                }
            }
            Value::Object(o) => {
                // Entries combine by a sum, which does not depend on their order.
                let sum = o.iter().fold(0u64, |acc, (k, e)| {
                    let mut eh = std::hash::DefaultHasher::new();
                    k.hash(&mut eh);
                    feed(e, &mut eh);
                    acc.wrapping_add(eh.finish())
                });
                (6u8, o.len(), sum).hash(h);
            }
        }
    }
    let mut h = std::hash::DefaultHasher::new();
    feed(v, &mut h);
    h.finish()
}

/// What an unordered comparison paired up.
struct Matching {
    /// For each legacy element, the new element it was matched with.
    partner: Vec<Option<usize>>,
    /// New elements not matched with any legacy element, in order.
    unmatched_new: Vec<usize>,
}

struct Walker<'r, 'v> {
    rules: &'r Rules,
    path: Vec<Seg<'v>>,
    out: Vec<PatchOp>,
    /// What is left of [`WORK_BUDGET`].
    work: usize,
}

impl<'v> Walker<'_, 'v> {
    fn ignored(&self) -> bool {
        !self.rules.ignore.is_empty() && self.rules.ignored(&self.path)
    }

    fn replace(&mut self, old: &Value, value: &Value) {
        if !self.ignored() {
            self.out.push(PatchOp::Replace {
                path: render(&self.path),
                old: old.clone(),
                value: value.clone(),
            });
        }
    }

    fn add(&mut self, seg: Seg<'v>, value: &Value) {
        self.path.push(seg);
        if !self.ignored() {
            self.out.push(PatchOp::Add {
                path: render(&self.path),
                value: value.clone(),
            });
        }
        self.path.pop();
    }

    fn remove(&mut self, seg: Seg<'v>, old: &Value) {
        self.path.push(seg);
        if !self.ignored() {
            self.out.push(PatchOp::Remove {
                path: render(&self.path),
                old: old.clone(),
            });
        }
        self.path.pop();
    }

    fn diff_at(&mut self, seg: Seg<'v>, a: &'v Value, b: &'v Value, depth: usize) {
        self.path.push(seg);
        self.diff(a, b, depth);
        self.path.pop();
    }

    fn eq_at(&mut self, seg: Seg<'v>, a: &'v Value, b: &'v Value, depth: usize) -> bool {
        self.path.push(seg);
        let same = self.eq(a, b, depth);
        self.path.pop();
        same
    }

    fn diff(&mut self, a: &'v Value, b: &'v Value, depth: usize) {
        match (a, b) {
            _ if depth >= MAX_DEPTH => {
                if a != b {
                    self.replace(a, b);
                }
            }
            (Value::Object(x), Value::Object(y)) => self.diff_objects(x, y, depth),
            (Value::Array(x), Value::Array(y)) => {
                // Arrays are where the walk does real work (alignment), so skip ignored ones.
                if !self.ignored() {
                    self.diff_arrays(x, y, depth);
                }
            }
            _ => {
                if !self.rules.scalar_eq(a, b) {
                    self.replace(a, b);
                }
            }
        }
    }

    fn eq(&mut self, a: &'v Value, b: &'v Value, depth: usize) -> bool {
        // Out of budget, "different" is always a sound answer (see the module's comment).
        if self.work == 0 {
            return false;
        }
        self.work -= 1;
        let same = match (a, b) {
            _ if depth >= MAX_DEPTH => a == b,
            (Value::Object(x), Value::Object(y)) => return self.eq_objects(x, y, depth),
            (Value::Array(x), Value::Array(y)) => self.eq_arrays(x, y, depth),
            _ => self.rules.scalar_eq(a, b),
        };
        // Ignore rules are only consulted where something differs, which keeps the common,
        // equal case free of pattern matching.
        same || self.ignored()
    }

    fn diff_objects(&mut self, x: &'v Map<String, Value>, y: &'v Map<String, Value>, depth: usize) {
        let mut common = 0;
        for (k, va) in x {
            match y.get(k) {
                Some(vb) => {
                    common += 1;
                    self.diff_at(Seg::Key(k), va, vb, depth + 1);
                }
                None => self.remove(Seg::Key(k), va),
            }
        }
        if common < y.len() {
            for (k, vb) in y {
                if !x.contains_key(k) {
                    self.add(Seg::Key(k), vb);
                }
            }
        }
    }

    fn eq_objects(
        &mut self,
        x: &'v Map<String, Value>,
        y: &'v Map<String, Value>,
        depth: usize,
    ) -> bool {
        let mut common = 0;
        for (k, va) in x {
            let same = match y.get(k) {
                Some(vb) => {
                    common += 1;
                    self.eq_at(Seg::Key(k), va, vb, depth + 1)
                }
                None => self.ignored_at(Seg::Key(k)),
            };
            if !same {
                return false;
            }
        }
        if common < y.len() {
            for k in y.keys() {
                if !x.contains_key(k) && !self.ignored_at(Seg::Key(k)) {
                    return false;
                }
            }
        }
        true
    }

    fn ignored_at(&mut self, seg: Seg<'v>) -> bool {
        self.path.push(seg);
        let ignored = self.ignored();
        self.path.pop();
        ignored
    }

    fn diff_arrays(&mut self, x: &'v [Value], y: &'v [Value], depth: usize) {
        let mode = self.rules.array_mode(&self.path);
        if mode.unordered {
            self.diff_unordered(x, y, mode.key, depth);
        } else {
            self.diff_ordered(x, y, mode.key, depth);
        }
    }

    /// The sound, cheap equality for arrays: same length and element by element (by key
    /// first for keyed arrays), or a complete matching for unordered ones.
    fn eq_arrays(&mut self, x: &'v [Value], y: &'v [Value], depth: usize) -> bool {
        if x.len() != y.len() {
            return false;
        }
        let mode = self.rules.array_mode(&self.path);
        if mode.unordered {
            let m = self.match_unordered(x, y, mode.key, depth);
            if !m.unmatched_new.is_empty() {
                return false;
            }
            // Elements matched by key may still differ inside.
            return mode.key.is_none()
                || m.partner.iter().enumerate().all(|(i, j)| match j {
                    Some(j) => self.eq_at(Seg::Index(i), &x[i], &y[*j], depth + 1),
                    None => false,
                });
        }
        (0..x.len()).all(|i| {
            let same_key = mode
                .key
                .is_none_or(|field| key_of(&x[i], field) == key_of(&y[i], field));
            same_key && self.eq_at(Seg::Index(i), &x[i], &y[i], depth + 1)
        })
    }

    /// Order matters: align the two arrays (whole-value equality, or key equality for keyed
    /// arrays), then walk the alignment front to back.
    fn diff_ordered(&mut self, x: &'v [Value], y: &'v [Value], key: Option<&str>, depth: usize) {
        let (n, m) = (x.len(), y.len());
        let budget = myers::edit_budget(n, m);
        let pairs = match key {
            // Out of budget: every element changed, paired up by position.
            None if self.work == 0 => Vec::new(),
            None => myers::align(n, m, budget, |i, j| {
                self.eq_at(Seg::Index(j), &x[i], &y[j], depth + 1)
            }),
            Some(field) => {
                let kx: Vec<_> = x.iter().map(|v| key_of(v, field)).collect();
                let ky: Vec<_> = y.iter().map(|v| key_of(v, field)).collect();
                myers::align(n, m, budget, |i, j| match (&kx[i], &ky[j]) {
                    (Some(a), Some(b)) => a == b,
                    (None, None) => self.eq_at(Seg::Index(j), &x[i], &y[j], depth + 1),
                    _ => false,
                })
            }
        };
        let (mut i, mut j) = (0, 0);
        // A sentinel pair past both ends flushes the last run of changes.
        for (pi, pj) in pairs.into_iter().chain([(n, m)]) {
            self.changed_run(x, y, (i, pi), (j, pj), key.is_none(), depth);
            if pi < n && key.is_some() {
                // Same key: the same entity, compared field by field.
                self.diff_at(Seg::Index(pj), &x[pi], &y[pj], depth + 1);
            }
            (i, j) = (pi + 1, pj + 1);
        }
    }

    /// Legacy `x[old.0..old.1]` became new `y[new.0..new.1]`; the run starts at position
    /// `new.0` of the array as patched so far. Plain arrays pair the run's elements by
    /// position and compare them (an edited element is a change inside it, not a remove and an
    /// add); keyed arrays do not, since a different key is a different entity.
    fn changed_run(
        &mut self,
        x: &'v [Value],
        y: &'v [Value],
        old: (usize, usize),
        new: (usize, usize),
        pair: bool,
        depth: usize,
    ) {
        let (d, k) = (old.1 - old.0, new.1 - new.0);
        let pos = new.0;
        let p = if pair { d.min(k) } else { 0 };
        for t in 0..p {
            self.diff_at(Seg::Index(pos + t), &x[old.0 + t], &y[new.0 + t], depth + 1);
        }
        // Legacy elements past the pairs sit at pos + p.. now; remove from the highest down
        // so every index stays valid as the patch is applied.
        for t in (p..d).rev() {
            self.remove(Seg::Index(pos + t), &x[old.0 + t]);
        }
        for t in p..k {
            self.add(Seg::Index(pos + t), &y[new.0 + t]);
        }
    }

    /// Pairs legacy and new elements of an unordered array: by key when the array has one
    /// (elements without the key by value), else by value, first same positions, then a
    /// bounded search.
    fn match_unordered(
        &mut self,
        x: &'v [Value],
        y: &'v [Value],
        key: Option<&str>,
        depth: usize,
    ) -> Matching {
        let (n, m) = (x.len(), y.len());
        let mut partner: Vec<Option<usize>> = vec![None; n];
        let mut taken = vec![false; m];
        // The passes below (keys, same positions, hashes) touch every element a few times:
        // charged up front, or arrays nested in arrays could do that work without end.
        let passes = 3 * (n + m);
        if self.work < passes {
            self.work = 0;
            return Matching {
                partner,
                unmatched_new: (0..m).collect(),
            };
        }
        self.work -= passes;
        if let Some(field) = key {
            let mut by_key: HashMap<Key<'v>, Vec<usize>> = HashMap::new();
            for (j, v) in y.iter().enumerate().rev() {
                if let Some(k) = key_of(v, field) {
                    by_key.entry(k).or_default().push(j);
                }
            }
            // Elements sharing a key are the same entity only up to which is which: pair
            // equal ones first, or a reordering of them would read as changes inside each.
            let mut legacy_count: HashMap<Key<'v>, usize> = HashMap::new();
            for v in x {
                if let Some(k) = key_of(v, field) {
                    *legacy_count.entry(k).or_default() += 1;
                }
            }
            for (i, v) in x.iter().enumerate() {
                let Some(k) = key_of(v, field) else {
                    continue;
                };
                let shared = legacy_count.get(&k).is_some_and(|&c| c > 1);
                let Some(candidates) = by_key.get_mut(&k) else {
                    continue;
                };
                if !shared && candidates.len() < 2 {
                    continue;
                }
                // Candidates run from the highest new index down: the lowest equal one.
                let mut found = None;
                for pos in (0..candidates.len()).rev() {
                    if self.work == 0 {
                        break;
                    }
                    if self.eq_at(Seg::Index(i), &x[i], &y[candidates[pos]], depth + 1) {
                        found = Some(pos);
                        break;
                    }
                }
                if let Some(pos) = found {
                    let j = candidates.remove(pos);
                    partner[i] = Some(j);
                    taken[j] = true;
                }
            }
            // The rest by key, in order.
            for (i, v) in x.iter().enumerate() {
                if partner[i].is_some() {
                    continue;
                }
                if let Some(j) = key_of(v, field).and_then(|k| by_key.get_mut(&k)?.pop()) {
                    partner[i] = Some(j);
                    taken[j] = true;
                }
            }
        }
        let keyless = |v: &Value| key.is_none_or(|field| key_of(v, field).is_none());
        for i in 0..n.min(m) {
            if partner[i].is_none()
                && !taken[i]
                && keyless(&x[i])
                && keyless(&y[i])
                && self.eq_at(Seg::Index(i), &x[i], &y[i], depth + 1)
            {
                partner[i] = Some(i);
                taken[i] = true;
            }
        }
        // Equal elements, found by hash in one pass whatever the order.
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for j in (0..m).rev() {
            if !taken[j] && keyless(&y[j]) {
                by_hash.entry(value_hash(&y[j])).or_default().push(j);
            }
        }
        if !by_hash.is_empty() {
            for i in 0..n {
                if partner[i].is_some() || !keyless(&x[i]) {
                    continue;
                }
                if self.work == 0 {
                    break;
                }
                let Some(candidates) = by_hash.get_mut(&value_hash(&x[i])) else {
                    continue;
                };
                // Candidates run from the highest new index down: take the lowest that is
                // equal (a hash collision, rare, is passed over).
                if let Some(pos) = candidates
                    .iter()
                    .rposition(|&j| self.eq_at(Seg::Index(i), &x[i], &y[j], depth + 1))
                {
                    let j = candidates.remove(pos);
                    partner[i] = Some(j);
                    taken[j] = true;
                }
            }
        }
        // What is left may be equal under the rules (an ignored field, a tolerance, nested
        // unordered arrays) without being equal element for element: a bounded search.
        for i in 0..n {
            if partner[i].is_some() || !keyless(&x[i]) {
                continue;
            }
            for j in 0..m {
                if taken[j] || !keyless(&y[j]) {
                    continue;
                }
                if self.work == 0 {
                    break;
                }
                self.work -= 1;
                if self.eq_at(Seg::Index(i), &x[i], &y[j], depth + 1) {
                    partner[i] = Some(j);
                    taken[j] = true;
                    break;
                }
            }
        }
        let unmatched_new = (0..m).filter(|&j| !taken[j]).collect();
        Matching {
            partner,
            unmatched_new,
        }
    }

    /// Order does not matter. The patch keeps matched legacy elements where they are: first
    /// changes inside matched (or, for plain arrays, paired-up leftover) elements at their
    /// legacy index, then removals from the highest index down, then additions appended at
    /// the end. Applied, it gives the new array up to the order of its elements.
    fn diff_unordered(&mut self, x: &'v [Value], y: &'v [Value], key: Option<&str>, depth: usize) {
        let Matching {
            mut partner,
            unmatched_new,
        } = self.match_unordered(x, y, key, depth);
        let mut leftover_new = unmatched_new.into_iter();
        // Which pairs may differ inside: keyed matches, and (plain arrays) leftovers paired
        // up in order. Plain matches are equal already.
        let mut walk = vec![key.is_some(); x.len()];
        if key.is_none() {
            for (i, p) in partner.iter_mut().enumerate() {
                if p.is_none()
                    && let Some(j) = leftover_new.next()
                {
                    *p = Some(j);
                    walk[i] = true;
                }
            }
        }
        for (i, p) in partner.iter().enumerate() {
            if let Some(j) = p
                && walk[i]
            {
                self.diff_at(Seg::Index(i), &x[i], &y[*j], depth + 1);
            }
        }
        let mut len = x.len();
        for i in (0..x.len()).rev() {
            if partner[i].is_none() {
                self.remove(Seg::Index(i), &x[i]);
                len -= 1;
            }
        }
        for j in leftover_new {
            self.add(Seg::Index(len), &y[j]);
            len += 1;
        }
    }
}
