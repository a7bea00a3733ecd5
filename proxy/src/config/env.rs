//! Reading variables from a source (the process environment, or a map the injector
//! built from annotations), collecting every bad value instead of stopping at the
//! first: each error names the variable, the value and what was expected.

use super::vars::Var;
use std::collections::HashMap;
use std::fmt;

/// One variable whose value could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadVar {
    pub name: &'static str,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for BadVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.name, self.value, self.expected)
    }
}

/// Every bad variable found in one read of the environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<BadVar>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, bad) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "invalid configuration: {bad}")?;
        }
        Ok(())
    }
}

/// Reads variables from a source (the process environment, or a map the injector built
/// from annotations), collecting errors instead of stopping at the first.
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

pub struct Env<'a> {
    lookup: Lookup<'a>,
    errors: Vec<BadVar>,
    /// Whether the files variables name are read and checked too.
    pub(super) check_files: bool,
}

impl<'a> Env<'a> {
    pub fn from_process() -> Env<'static> {
        Env {
            lookup: Box::new(|name| std::env::var(name).ok()),
            errors: Vec::new(),
            check_files: true,
        }
    }

    pub fn from_map(map: &'a HashMap<String, String>) -> Env<'a> {
        Env {
            lookup: Box::new(move |name| map.get(name).cloned()),
            errors: Vec::new(),
            check_files: true,
        }
    }

    /// The value of `var` parsed with `parse`, or its default when unset. A bad value
    /// is recorded and the default is returned so that reading can go on and report
    /// every bad variable at once.
    pub fn get<T>(&mut self, var: &Var, parse: impl Fn(&str) -> Result<T, String>) -> T {
        if let Some(value) = (self.lookup)(var.name) {
            match parse(&value) {
                Ok(v) => return v,
                Err(expected) => self.errors.push(BadVar {
                    name: var.name,
                    value,
                    expected,
                }),
            }
        }
        match parse(var.default) {
            Ok(v) => v,
            Err(e) => panic!("default of {} does not parse: {e}", var.name),
        }
    }

    /// Records a problem found by a check across several variables.
    /// The value of `name` as given, if it is set.
    pub fn raw(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
    }

    pub fn reject(&mut self, var: &Var, value: impl ToString, expected: impl ToString) {
        self.errors.push(BadVar {
            name: var.name,
            value: value.to_string(),
            expected: expected.to_string(),
        });
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.errors))
        }
    }
}
