//! Enums with a name on the wire, written once: [`wire_enum!`] declares the enum from a table of
//! variants and their names, and derives from that one table the list of every value (`ALL`,
//! which the OpenAPI contract test holds the document to), `as_str`, `parse`, `Display`, and
//! serde's form, so the four can never disagree.

/// Declares `enum $name { $variant = "wire-name", ... }` with `ALL`, `as_str`, `parse`,
/// `Display` and serde (`Serialize`, `Deserialize`) all from the same table.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $wire:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            /// Its name on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $wire,)*
                }
            }

            /// The value a wire name stands for.
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($wire => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).ok_or_else(|| {
                    serde::de::Error::unknown_variant(&s, &[$($wire),*])
                })
            }
        }
    };
}

pub(crate) use wire_enum;

#[cfg(test)]
mod tests {
    wire_enum! {
        /// A test enum.
        enum Colour {
            /// Red.
            Red = "red",
            /// Sky blue.
            SkyBlue = "sky-blue",
        }
    }

    #[test]
    fn the_table_is_the_only_source() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::SkyBlue]);
        for c in Colour::ALL {
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
            assert_eq!(serde_json::from_str::<Colour>(&json).unwrap(), *c);
            assert_eq!(Colour::parse(c.as_str()), Some(*c));
        }
        let e = serde_json::from_str::<Colour>("\"green\"").unwrap_err();
        assert!(e.to_string().contains("unknown variant `green`"), "{e}");
        assert_eq!(Colour::parse("green"), None);
    }
}
