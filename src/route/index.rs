//! The route index: a segment trie compiled once per rules load. A lookup walks the request
//! path once, touching only nodes whose segments match, so its cost grows with the path's
//! depth and the number of routes sharing a path shape, not with the number of routes.

use std::collections::HashMap;

use super::{RequestHead, conditions_match};
use crate::rules::Route;
use crate::rules::pattern::Seg;

#[derive(Debug, Default)]
pub(crate) struct Index {
    nodes: Vec<Node>,
}

/// Route lists hold ranks in ascending order (best first), so a scan stops at the first hit.
#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, u32>,
    param: Option<u32>,
    /// Closed patterns that end at this node.
    end: Vec<u32>,
    /// Patterns ending in `/**` here: they match whatever follows.
    rest: Vec<u32>,
    /// `path_prefix` patterns: the next segment starts with the text, then anything follows.
    prefix: Vec<(Box<str>, Vec<u32>)>,
}

impl Index {
    /// Builds the index from routes in precedence order.
    pub(crate) fn build(routes: &[Route]) -> Index {
        let mut index = Index {
            nodes: vec![Node::default()],
        };
        for route in routes {
            let mut node = 0usize;
            let mut list_prefix = None;
            for seg in &route.path.segs {
                node = match seg {
                    Seg::Lit(lit) => match index.nodes[node].literal.get(lit) {
                        Some(&child) => child as usize,
                        None => {
                            let child = index.push();
                            index.nodes[node].literal.insert(lit.clone(), child as u32);
                            child
                        }
                    },
                    Seg::Param(_) => match index.nodes[node].param {
                        Some(child) => child as usize,
                        None => {
                            let child = index.push();
                            index.nodes[node].param = Some(child as u32);
                            child
                        }
                    },
                    // Only ever the last segment of a prefix pattern.
                    Seg::StartsWith(text) => {
                        list_prefix = Some(text.clone());
                        node
                    }
                };
            }
            let n = &mut index.nodes[node];
            match list_prefix {
                Some(text) => match n.prefix.iter_mut().find(|(t, _)| *t == text) {
                    Some((_, list)) => list.push(route.rank),
                    None => n.prefix.push((text, vec![route.rank])),
                },
                None if route.path.open => n.rest.push(route.rank),
                None => n.end.push(route.rank),
            }
        }
        index
    }

    fn push(&mut self) -> usize {
        self.nodes.push(Node::default());
        self.nodes.len() - 1
    }

    /// The rank of the best route matching `req`, if any.
    pub(crate) fn best(&self, routes: &[Route], req: &RequestHead<'_>) -> Option<usize> {
        let mut best = u32::MAX;
        match req.path.strip_prefix('/') {
            Some(rest) => self.walk(0, Some(rest), routes, req, &mut best),
            // `*` (OPTIONS) or an empty path: only routes that match any path take it.
            None => consider(&self.nodes[0].rest, routes, req, &mut best),
        }
        (best != u32::MAX).then_some(best as usize)
    }

    fn walk(
        &self,
        node: usize,
        rest: Option<&str>,
        routes: &[Route],
        req: &RequestHead<'_>,
        best: &mut u32,
    ) {
        let n = &self.nodes[node];
        consider(&n.rest, routes, req, best);
        let Some(rest) = rest else {
            consider(&n.end, routes, req, best);
            return;
        };
        let (seg, next) = match rest.split_once('/') {
            Some((seg, next)) => (seg, Some(next)),
            None => (rest, None),
        };
        for (text, list) in &n.prefix {
            if seg.starts_with(&**text) {
                consider(list, routes, req, best);
            }
        }
        if let Some(&child) = n.literal.get(seg) {
            self.walk(child as usize, next, routes, req, best);
        }
        if !seg.is_empty()
            && let Some(child) = n.param
        {
            self.walk(child as usize, next, routes, req, best);
        }
    }
}

fn consider(list: &[u32], routes: &[Route], req: &RequestHead<'_>, best: &mut u32) {
    for &rank in list {
        if rank >= *best {
            return;
        }
        if conditions_match(&routes[rank as usize], req) {
            *best = rank;
            return;
        }
    }
}
