#!/usr/bin/env python3
"""The founding document's Keras example, run by Kiln with only the imports
changed: a Dense(10, relu) -> Dense(1, sigmoid) binary classifier trained
with binary_crossentropy and Adam for 10 epochs in batches of 32, on
scikit-learn's breast cancer data (bundled, offline).

    python examples/seed_keras.py

The Keras original, for comparison (the lines below the imports are the
same in this file):

    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
    from keras.models import Sequential
    from keras.layers import Dense

    X, y = load_breast_cancer(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
    scaler = StandardScaler()
    X_train = scaler.fit_transform(X_train)
    X_test = scaler.transform(X_test)

    model = Sequential()
    model.add(Dense(10, activation='relu', input_shape=(X_train.shape[1],)))
    model.add(Dense(1, activation='sigmoid'))
    model.compile(optimizer='adam', loss='binary_crossentropy', metrics=['accuracy'])
    model.summary()
    history = model.fit(X_train, y_train, epochs=10, batch_size=32, validation_split=0.2)
    loss, accuracy = model.evaluate(X_test, y_test)
    print(f"Test loss: {loss:.4f}, test accuracy: {accuracy:.4f}")
    predictions = model.predict(X_test)
    print(predictions[:5])

Kiln trains it in its Go core over libtorch, with the sigmoid fused into the
loss (BCE-with-logits on the sigmoid's input), and predicts probabilities
as Keras does. tests/python/test_seed_keras.py checks that the accuracy
matches the same network trained in Python torch.
"""
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from kiln import Sequential
from kiln.layers import Dense

X, y = load_breast_cancer(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=42)
scaler = StandardScaler()
X_train = scaler.fit_transform(X_train)
X_test = scaler.transform(X_test)

model = Sequential()
model.add(Dense(10, activation='relu', input_shape=(X_train.shape[1],)))
model.add(Dense(1, activation='sigmoid'))
model.compile(optimizer='adam', loss='binary_crossentropy', metrics=['accuracy'])
model.summary()
history = model.fit(X_train, y_train, epochs=10, batch_size=32, validation_split=0.2)
loss, accuracy = model.evaluate(X_test, y_test)
print(f"Test loss: {loss:.4f}, test accuracy: {accuracy:.4f}")
predictions = model.predict(X_test)
print(predictions[:5])
