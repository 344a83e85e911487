//! A fleet member's part of its groups' fleet-wide limits: the coordination session divides
//! each group's `max_connections` and `reserved_connections` among the members by demand
//! (see [`crate::fleet`]), and the pools apply the smaller of a group's configured limits and
//! this member's share of them.

use super::super::GroupLimits;
use super::State;

/// This member's share of a group's fleet-wide limits; `None`: the configured limit applies
/// (a lone instance, or a limit the group does not have).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupShare {
    pub max_connections: Option<u32>,
    pub reserved: Option<u32>,
}

/// The limits a group has here: the configured ones, lowered to this member's share.
pub fn effective(configured: GroupLimits, share: Option<&GroupShare>) -> GroupLimits {
    let Some(share) = share else {
        return configured;
    };
    let max_connections = match (configured.max_connections, share.max_connections) {
        (Some(c), Some(s)) => Some(c.min(s)),
        (c, s) => c.or(s),
    };
    let reserved = share
        .reserved
        .map_or(configured.reserved, |r| r.min(configured.reserved))
        .min(max_connections.unwrap_or(u32::MAX));
    GroupLimits {
        max_connections,
        reserved,
        max_waiting: configured.max_waiting,
    }
}

impl<C: Send + 'static> State<C> {
    /// Sets this member's shares of its groups' limits, in place of those set before (a group
    /// not named has its configured limits; one not seen yet gets its share when it is made).
    /// Returns whether they changed.
    pub fn set_group_shares(&mut self, shares: &[(&str, GroupShare)]) -> bool {
        let same = shares.len() == self.shares.len()
            && shares
                .iter()
                .all(|(name, share)| self.shares.get(*name) == Some(share));
        if same {
            return false;
        }
        self.shares.clear();
        for (name, share) in shares {
            self.shares.insert(name.to_string(), *share);
        }
        for g in &mut self.groups {
            g.limits = effective(g.configured, self.shares.get(&g.name));
        }
        true
    }

    /// A group's (lent and connecting, waiting) here, (0, 0) for a group not seen yet.
    pub fn group_demand(&self, name: &str) -> (u32, u32) {
        self.find_group(name).map_or((0, 0), |g| {
            let g = &self.groups[g.0];
            (g.active, g.waiters.len() as u32)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_lowers_the_configured_limits_and_never_raises_them() {
        let configured = GroupLimits {
            max_connections: Some(10),
            reserved: 4,
            max_waiting: Some(7),
        };
        assert_eq!(effective(configured, None).max_connections, Some(10));
        let share = GroupShare {
            max_connections: Some(3),
            reserved: Some(6),
        };
        let e = effective(configured, Some(&share));
        // The reservation is capped by the share of the cap, and by its own configured value.
        assert_eq!(
            (e.max_connections, e.reserved, e.max_waiting),
            (Some(3), 3, Some(7))
        );
        let share = GroupShare {
            max_connections: Some(20),
            reserved: Some(1),
        };
        let e = effective(configured, Some(&share));
        assert_eq!((e.max_connections, e.reserved), (Some(10), 1));
        let share = GroupShare {
            max_connections: None,
            reserved: Some(0),
        };
        let e = effective(configured, Some(&share));
        assert_eq!((e.max_connections, e.reserved), (Some(10), 0));
    }
}
