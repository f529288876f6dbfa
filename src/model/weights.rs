//! A bag of named tensors that model constructors take from, so a missing or
//! left-over tensor is an error that names it.

use std::collections::BTreeMap;

use mlx_rs::Array;

use super::ModelError;

#[derive(Debug, Default, Clone)]
pub struct WeightMap {
    arrays: BTreeMap<String, Array>,
}

impl WeightMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: String, array: Array) {
        self.arrays.insert(name, array);
    }

    pub fn take(&mut self, name: &str) -> Result<Array, ModelError> {
        self.arrays
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    }

    pub fn take_optional(&mut self, name: &str) -> Option<Array> {
        self.arrays.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.arrays.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<&Array> {
        self.arrays.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.arrays.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.arrays.len()
    }

    pub fn is_empty(&self) -> bool {
        self.arrays.is_empty()
    }

    pub fn into_inner(self) -> BTreeMap<String, Array> {
        self.arrays
    }

    /// After a model took what it needs, anything left is a tensor it does
    /// not know: a sign of the wrong architecture or a corrupt file.
    pub fn expect_consumed(&self) -> Result<(), ModelError> {
        match self.arrays.keys().next() {
            None => Ok(()),
            Some(first) => Err(ModelError::UnexpectedTensor {
                name: first.clone(),
                count: self.arrays.len(),
            }),
        }
    }
}

impl FromIterator<(String, Array)> for WeightMap {
    fn from_iter<I: IntoIterator<Item = (String, Array)>>(iter: I) -> Self {
        Self {
            arrays: iter.into_iter().collect(),
        }
    }
}
