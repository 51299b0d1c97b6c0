//! What one request carries through a forward pass: the KV cache, the running input sums of
//! sequence-routed modules, which ensemble members a stacked batch's rows belong to, and an
//! optional trace of routing decisions. Models hold weights only; everything that changes
//! while a request runs lives here, so one loaded model serves many requests at once and a
//! forward split over threads carries its state with it (no thread-locals).

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::Result;

/// The routing weights one routed module gave every input row of one forward call.
#[derive(Debug, Clone)]
pub struct RoutingRecord {
    /// Module path, e.g. `model.layers.0.mlp.fc1` (`#j` appended for member `j` of a stacked
    /// ensemble).
    pub module: String,
    /// The routed units in column order: expert names (the plan's order; with an Arrow
    /// router, skipping experts that do not adapt the module) or group names.
    pub units: Vec<String>,
    /// `[rows, U]`; 0 for units outside the top-k.
    pub weights: Tensor,
}

/// A module's running input sum per sequence, so sequence-level routing sees every position
/// so far across decoding steps.
#[derive(Debug, Clone)]
pub(crate) struct SequenceSum {
    /// `[rows, in]`, f32.
    pub sum: Tensor,
    /// Positions summed so far.
    pub seen: usize,
    /// The stacked-ensemble member whose block of rows it covers; `None`: every row.
    member: Option<usize>,
}

/// Routing records with the index of the linear-layer call that made them, so records made
/// on several threads can be put back in the order one thread would have made them.
#[derive(Debug, Clone, Default)]
struct Trace {
    records: Vec<(usize, RoutingRecord)>,
    /// Adapted linear layers run so far in this request.
    calls: usize,
}

/// Which members' blocks of rows a part of a stacked ensemble's batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemberPart {
    pub first: usize,
    pub count: usize,
}

/// How a state is cut into parts that run on their own threads.
pub(crate) enum Cut<'a> {
    /// Consecutive rows, `sizes` of them per part.
    Rows(&'a [usize]),
    /// Whole member blocks of a stacked ensemble: `sizes` rows and these members per part.
    Members(&'a [usize], &'a [MemberPart]),
}

/// Per-request state of a forward pass (see the module docs). Start each request with
/// [`ForwardState::new`] (or [`ForwardState::tracing`]) and pass the same state to every
/// step of an incremental decode.
#[derive(Debug, Clone, Default)]
pub struct ForwardState {
    /// Per layer, the cached keys and values `[b, kv_heads, s, head_dim]`.
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// Sequence-routed modules' running sums, by module key (`module` or `module#j`).
    sums: BTreeMap<String, SequenceSum>,
    /// One state per member of an ensemble whose members run one after another.
    members: Vec<ForwardState>,
    /// Set while a part of a stacked ensemble's batch runs.
    part: Option<MemberPart>,
    /// The stacked member whose update is running: tags the sums it creates.
    active_member: Option<usize>,
    trace: Option<Trace>,
    /// Threads a multi-row forward may split over; `None`: the engine's policy.
    threads: Option<usize>,
}

impl ForwardState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty state that records every routing decision (see [`Self::take_trace`]).
    pub fn tracing() -> Self {
        Self {
            trace: Some(Trace::default()),
            ..Self::default()
        }
    }

    /// Splits multi-row forwards of this request over exactly `threads` threads (at most one
    /// per row or member), whatever the engine's policy would choose.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.max(1));
        self
    }

    /// The threads asked for with [`Self::with_threads`].
    pub(crate) fn threads(&self) -> Option<usize> {
        self.threads
    }

    /// The routing decisions recorded so far, in the order the modules ran (empty when not
    /// tracing); recording goes on.
    pub fn take_trace(&mut self) -> Vec<RoutingRecord> {
        match &mut self.trace {
            Some(t) => std::mem::take(&mut t.records)
                .into_iter()
                .map(|(_, r)| r)
                .collect(),
            None => Vec::new(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.members.first() {
            Some(m) if self.kv.is_empty() => m.len(),
            _ => self.layer_len(0),
        }
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on the state of ensemble member `i` (created on first use); the trace, if
    /// any, is shared.
    pub(crate) fn with_member<T>(&mut self, i: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        if self.members.len() <= i {
            self.members.resize_with(i + 1, ForwardState::new);
        }
        let member = &mut self.members[i];
        member.trace = self.trace.take();
        member.threads = self.threads;
        let out = f(member);
        self.trace = member.trace.take();
        out
    }

    /// Number of positions cached for one layer.
    pub(crate) fn layer_len(&self, layer: usize) -> usize {
        match self.kv.get(layer) {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// Appends this step's keys and values (`[b, kv_heads, t, head_dim]`) for `layer` and
    /// returns the full keys and values so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.kv.len() <= layer {
            self.kv.resize(layer + 1, None);
        }
        let kv = match self.kv[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.kv[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// The member blocks this part of a stacked batch holds, if it is one.
    pub(crate) fn member_part(&self) -> Option<MemberPart> {
        self.part
    }

    pub(crate) fn set_member_part(&mut self, part: Option<MemberPart>) {
        self.part = part;
    }

    /// Runs `f` while member `member`'s update runs (its sums are tagged with it).
    pub(crate) fn as_member<T>(&mut self, member: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        let previous = self.active_member.replace(member);
        let out = f(self);
        self.active_member = previous;
        out
    }

    /// The running input sum kept under `key`, if any.
    pub(crate) fn sequence_sum(&self, key: &str) -> Option<&SequenceSum> {
        self.sums.get(key)
    }

    /// Replaces the running input sum under `key`.
    pub(crate) fn set_sequence_sum(&mut self, key: &str, sum: Tensor, seen: usize) {
        let member = self.active_member;
        self.sums
            .insert(key.to_string(), SequenceSum { sum, seen, member });
    }

    /// Counts one adapted linear layer's call (what orders records made on several threads).
    pub(crate) fn count_call(&mut self) {
        if let Some(t) = &mut self.trace {
            t.calls += 1;
        }
    }

    /// Whether routing decisions are being recorded.
    pub(crate) fn is_tracing(&self) -> bool {
        self.trace.is_some()
    }

    /// Records a routing decision (ignored when not tracing).
    pub(crate) fn note(&mut self, record: RoutingRecord) {
        if let Some(t) = &mut self.trace {
            t.records.push((t.calls, record));
        }
    }

    /// Cuts the state into parts that run on their own threads (views of the cache, no copy).
    pub(crate) fn split(&self, cut: &Cut<'_>) -> Result<Vec<ForwardState>> {
        let (sizes, members) = match cut {
            Cut::Rows(sizes) => (*sizes, None),
            Cut::Members(sizes, members) => (*sizes, Some(*members)),
        };
        let mut parts: Vec<ForwardState> = (0..sizes.len())
            .map(|i| ForwardState {
                part: members.map(|m| m[i]),
                trace: self.trace.as_ref().map(|t| Trace {
                    records: Vec::new(),
                    calls: t.calls,
                }),
                threads: Some(1),
                ..ForwardState::default()
            })
            .collect();
        for (key, s) in &self.sums {
            match (s.member, members) {
                // A member's sum goes whole to the part running that member.
                (Some(j), Some(members)) => {
                    if let Some(i) = members
                        .iter()
                        .position(|p| (p.first..p.first + p.count).contains(&j))
                    {
                        parts[i].sums.insert(key.clone(), s.clone());
                    }
                }
                _ => {
                    let mut start = 0;
                    for (part, &n) in parts.iter_mut().zip(sizes) {
                        let sum = s.sum.narrow(0, start, n)?;
                        part.sums
                            .insert(key.clone(), SequenceSum { sum, ..s.clone() });
                        start += n;
                    }
                }
            }
        }
        for layer in &self.kv {
            let mut start = 0;
            for (part, &n) in parts.iter_mut().zip(sizes) {
                part.kv.push(match layer {
                    Some((k, v)) => Some((k.narrow(0, start, n)?, v.narrow(0, start, n)?)),
                    None => None,
                });
                start += n;
            }
        }
        Ok(parts)
    }

    /// Joins the parts [`Self::split`] made (after they ran) back into this state.
    pub(crate) fn join(&mut self, parts: Vec<ForwardState>, cut: &Cut<'_>) -> Result<()> {
        let by_members = matches!(cut, Cut::Members(..));
        let layers = parts.iter().map(|p| p.kv.len()).max().unwrap_or(0);
        self.kv.clear();
        for l in 0..layers {
            let kvs: Option<Vec<&(Tensor, Tensor)>> = parts
                .iter()
                .map(|p| p.kv.get(l).and_then(Option::as_ref))
                .collect();
            self.kv.push(match kvs {
                Some(kvs) => {
                    let ks: Vec<&Tensor> = kvs.iter().map(|kv| &kv.0).collect();
                    let vs: Vec<&Tensor> = kvs.iter().map(|kv| &kv.1).collect();
                    Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
                }
                None => None,
            });
        }
        self.sums.clear();
        if let Some(first) = parts.first() {
            for (key, s) in &first.sums {
                if s.member.is_none() || !by_members {
                    let sums: Vec<&Tensor> = parts
                        .iter()
                        .filter_map(|p| p.sums.get(key).map(|s| &s.sum))
                        .collect();
                    let sum = Tensor::cat(&sums, 0)?;
                    self.sums
                        .insert(key.clone(), SequenceSum { sum, ..s.clone() });
                }
            }
        }
        if by_members {
            for part in &parts {
                for (key, s) in part.sums.iter().filter(|(_, s)| s.member.is_some()) {
                    self.sums.insert(key.clone(), s.clone());
                }
            }
        }
        if let Some(trace) = &mut self.trace {
            join_traces(trace, parts.into_iter().filter_map(|p| p.trace), by_members)?;
        }
        Ok(())
    }
}

/// Puts the records of parts back in one thread's order: a row split made the same records
/// on every part, joined along the rows; a member split made each member's records on its
/// own part, ordered by call (then member, as parts hold members in order).
fn join_traces(
    into: &mut Trace,
    parts: impl Iterator<Item = Trace>,
    by_members: bool,
) -> Result<()> {
    let parts: Vec<Trace> = parts.collect();
    let calls = parts.iter().map(|p| p.calls).max().unwrap_or(into.calls);
    let same_shape = parts
        .windows(2)
        .all(|w| w[0].records.len() == w[1].records.len());
    if by_members || !same_shape {
        let mut all: Vec<(usize, RoutingRecord)> =
            parts.into_iter().flat_map(|p| p.records).collect();
        all.sort_by_key(|(call, _)| *call);
        into.records.extend(all);
    } else if let Some(first) = parts.first() {
        for (i, (call, record)) in first.records.iter().enumerate() {
            let weights: Vec<&Tensor> = parts.iter().map(|p| &p.records[i].1.weights).collect();
            into.records.push((
                *call,
                RoutingRecord {
                    weights: Tensor::cat(&weights, 0)?,
                    ..record.clone()
                },
            ));
        }
    }
    into.calls = calls;
    Ok(())
}
