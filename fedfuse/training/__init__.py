"""Local work of a federated round, without Flower: data, model, LoRA, training, evaluation, Fisher."""
