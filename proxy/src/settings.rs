//! Run-time settings by name (`application_name`, `TimeZone`, ...): what a client asked for at
//! startup, and what Sluice last applied on a server connection.

use crate::shared::{Interner, Shared};

/// A client's settings from its StartupMessage: lower-cased name → value as given, sorted by
/// name. A sorted vector rather than a `BTreeMap`: sessions keep these for their lifetime and
/// usually have zero to three, where a B-tree node alone takes over 500 bytes. Shared between
/// the sessions that asked for the same (see [`crate::shared`]), copied when one changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Settings(Shared<(String, String)>);

impl Settings {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0
            .as_slice()
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn insert(&mut self, name: String, value: String) {
        match self.find(&name) {
            Ok(i) if self.0.as_slice()[i].1 == value => {}
            Ok(i) => self.0.make_mut()[i].1 = value,
            Err(i) => self.0.make_mut().insert(i, (name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&String> {
        self.find(name).ok().map(|i| &self.0.as_slice()[i].1)
    }

    /// The stored name and value of `name`.
    pub fn get_key_value(&self, name: &str) -> Option<(&String, &String)> {
        let pairs = self.0.as_slice();
        self.find(name).ok().map(|i| (&pairs[i].0, &pairs[i].1))
    }

    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.find(name).ok()?;
        Some(self.0.make_mut().remove(i).1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.as_slice().iter().map(|(n, _)| n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.as_slice().iter().map(|(n, v)| (n, v))
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.0.as_slice().is_empty()
    }

    /// Shares these settings with every other holder of the same ones.
    pub fn intern(&mut self, interner: &Interner<Vec<(String, String)>>) {
        self.0.intern(interner);
    }
}

impl FromIterator<(String, String)> for Settings {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut s = Settings::new();
        for (n, v) in iter {
            s.insert(n, v);
        }
        s
    }
}

impl<const N: usize> From<[(String, String); N]> for Settings {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

#[cfg(test)]
impl std::ops::Index<&str> for Settings {
    type Output = String;
    fn index(&self, name: &str) -> &String {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no setting {name}"),
        }
    }
}
