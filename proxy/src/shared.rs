//! Values that many sessions hold alike: a function's clients log in with the same settings
//! and are told the same server parameters. [`Interner`] gives them one shared copy, which
//! the holders of [`Shared`] copy only when they change it, so an idle client keeps a pointer
//! where it would keep a copy.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;

/// Distinct values kept for sharing; beyond it values no session holds any more are dropped,
/// and a value that still does not fit is left unshared.
const INTERNED_MAX: usize = 1024;

/// One shared copy of each distinct value handed to [`Interner::intern`].
pub struct Interner<T> {
    set: Mutex<HashSet<Arc<T>>>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            set: Mutex::new(HashSet::new()),
        }
    }
}

impl<T: Eq + Hash> Interner<T> {
    /// The shared copy of `value`.
    pub fn intern(&self, value: T) -> Arc<T> {
        let mut set = self.set.lock();
        if let Some(shared) = set.get(&value) {
            return shared.clone();
        }
        if set.len() >= INTERNED_MAX {
            set.retain(|v| Arc::strong_count(v) > 1);
        }
        let shared = Arc::new(value);
        if set.len() < INTERNED_MAX {
            set.insert(shared.clone());
        }
        shared
    }

    /// Distinct values kept.
    pub fn len(&self) -> usize {
        self.set.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A list of `T`, empty without an allocation, shared until changed (copy on write).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shared<T>(Option<Arc<Vec<T>>>);

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared(None)
    }
}

impl<T: Clone> Shared<T> {
    pub fn as_slice(&self) -> &[T] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The list to change: copied first if it is shared.
    pub fn make_mut(&mut self) -> &mut Vec<T> {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }

    /// Shares this list with every other holder of an equal one.
    pub fn intern(&mut self, interner: &Interner<Vec<T>>)
    where
        T: Eq + Hash,
    {
        if let Some(v) = self.0.take() {
            if !v.is_empty() {
                self.0 = Some(interner.intern(Arc::unwrap_or_clone(v)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_lists_share_one_copy_until_one_changes() {
        let interner = Interner::default();
        let mut a = Shared::default();
        a.make_mut().push(1);
        let mut b = a.clone();
        b.make_mut().push(2);
        b.make_mut().pop();
        a.intern(&interner);
        b.intern(&interner);
        assert_eq!(interner.len(), 1);
        assert!(std::ptr::eq(a.as_slice(), b.as_slice()));
        b.make_mut().push(3);
        assert_eq!(a.as_slice(), &[1]);
        assert_eq!(b.as_slice(), &[1, 3]);
        assert!(Shared::<u8>::default().as_slice().is_empty());
    }

    #[test]
    fn the_interner_is_bounded_and_drops_what_nobody_holds() {
        let interner = Interner::default();
        let held: Vec<Arc<usize>> = (0..INTERNED_MAX).map(|i| interner.intern(i)).collect();
        // Full of values still held: a new one is returned unshared.
        let extra = interner.intern(INTERNED_MAX);
        assert_eq!(interner.len(), INTERNED_MAX);
        assert!(!Arc::ptr_eq(&extra, &interner.intern(INTERNED_MAX)));
        drop(held);
        interner.intern(INTERNED_MAX + 1);
        assert_eq!(interner.len(), 1);
    }
}
