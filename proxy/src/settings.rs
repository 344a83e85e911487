//! Run-time settings by name (`application_name`, `TimeZone`, ...): what a client asked for at
//! startup, and what Sluice last applied on a server connection.

/// A client's settings from its StartupMessage: lower-cased name → value as given, sorted by
/// name. A sorted vector rather than a `BTreeMap`: sessions keep these for their lifetime and
/// usually have zero to three, where a B-tree node alone takes over 500 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings(Vec<(String, String)>);

impl Settings {
    pub fn new() -> Self {
        Self::default()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn insert(&mut self, name: String, value: String) {
        match self.find(&name) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&String> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// The stored name and value of `name`.
    pub fn get_key_value(&self, name: &str) -> Option<(&String, &String)> {
        self.find(name).ok().map(|i| (&self.0[i].0, &self.0[i].1))
    }

    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.find(name).ok().map(|i| self.0.remove(i).1)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(n, _)| n)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(n, v)| (n, v))
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
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
